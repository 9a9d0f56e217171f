"""Adapter for Hugging Face LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT
(`LlavaNextForConditionalGeneration`): CLIP-style tower, projector, AnyRes grid, unpadding, newlines.

Where things are taken:
* CLS rows: forward hooks on `q_proj`/`k_proj` of the chosen CLIP encoder layers (`ClsRowCapture`).
* New rows (VisionZip, pool): the feature layer's keys (k_proj hook, averaged over heads) and the
  pre-projector features (a pre-hook on `multi_modal_projector`) are captured (`FeatureCapture`);
  merged rows are mapped to the LLM's space by the model's own projector (`project`).
* Layout: the model's own `pack_image_features` run on index tensors, so the position → (crop,
  patch) map is exactly the unpadding the installed transformers performs.  At extreme aspect
  ratios (20×2000 px on llava-v1.6) unpadding leaves the sub-image grid no position at all; the
  image is then the base image (plus one bare newline per grid row for a tall picture), the
  sub-images get a zero share and the base image carries the whole budget
  (`vlmdrop.ops.anyres`).  Any error in describing an image names its index and `image_sizes`.
* `image_sizes`: `generate` encodes images before the first forward and then drops `image_sizes`,
  so the base model's class is swapped, on this instance only, for a subclass whose
  `get_image_features` describes each image as it is encoded (the original class is restored by
  `remove()`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmdrop.interface import ImageTokens
from vlmdrop.ops.anyres import base_region_map, content_box_from_layout

from .base import HFVlmAdapter, ImageInput, register_adapter
from .hf_vlm import ENCODED_ATTR, feature_layer_index, pooled_images, with_pooler_output
from .state import EncodeRecord


def init_llava_family(adapter: HFVlmAdapter, model: nn.Module, *, strategy: str, why: str, vit: str) -> None:
    """The LLaVA family's facts (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision): inner model, ViT layers, heads and
    scale, crop grid, feature layer, image and pad token; `strategy` the one `vision_feature_select_strategy`
    supported (`why` says why, `vit` names the tower kind in the error)."""
    adapter.base = model.model
    adapter.config = model.config
    tower = adapter.base.vision_tower
    vm = getattr(tower, "vision_model", tower)
    try:
        adapter.layers = list(vm.encoder.layers)
    except AttributeError as e:
        raise ValueError(f"vision tower {type(tower).__name__} has no encoder.layers; vlmdrop expects {vit}") from e
    attn = adapter.layers[0].self_attn
    adapter.num_heads, adapter.scale = attn.num_heads, attn.scale
    vcfg = adapter.config.vision_config
    adapter.crop_hw = (vcfg.image_size // vcfg.patch_size,) * 2
    if adapter.config.vision_feature_select_strategy != strategy:
        raise ValueError(f"vision_feature_select_strategy={adapter.config.vision_feature_select_strategy!r}: "
                         f"vlmdrop supports {strategy!r} ({why}) only")
    adapter.feature_layer = feature_layer_index(adapter.config.vision_feature_layer, len(adapter.layers))
    adapter.image_token_id = adapter.config.image_token_id
    pad = getattr(adapter.config.text_config, "pad_token_id", None)
    adapter.pad_token_id = pad if pad is not None else 0


@register_adapter
class LlavaAdapter(HFVlmAdapter):
    """LLaVA-1.5 and LLaVA-NeXT on the Hugging Face classes."""

    supported = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

        return isinstance(model, (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from transformers import LlavaNextForConditionalGeneration

        self.is_next = isinstance(model, LlavaNextForConditionalGeneration)
        init_llava_family(self, model, strategy="default", why="CLS removed", vit="a CLIP-style ViT")
        # (n_crops, image size) -> the layout's index tensors (read-only, shared by every image of that size)
        self._geometry: dict[tuple[int, tuple[int, int]], tuple[Any, ...]] = {}

    # -------------------------------------------------------------- encoding
    def encode(self, kw: dict) -> Any:
        """Run the model's own `get_image_features` as its forward would."""
        args = {"pixel_values": kw["pixel_values"], "vision_feature_layer": kw.get("vision_feature_layer"),
                "vision_feature_select_strategy": kw.get("vision_feature_select_strategy"), "return_dict": True}
        if self.is_next or kw.get("image_sizes") is not None:
            args["image_sizes"] = kw.get("image_sizes")
        return self.base.get_image_features(**args)

    def on_encoded(self, out: Any, image_sizes: Any, record: EncodeRecord) -> None:
        """Describe every image of a `get_image_features` call while its inputs are known; the
        `ImageTokens` is attached to the image's feature tensor (`ENCODED_ATTR`: `generate` repeats
        the tensors of `pooler_output` for beams, and every copy is the image it repeats)."""
        rows, keys, hidden = record.cls_rows, record.keys, record.hidden
        feats = list(out.pooler_output)
        if self.is_next:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            if image_sizes is None:
                raise ValueError("LLaVA-NeXT images need image_sizes")
            sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(image_sizes).tolist()]
            n_crops = [image_size_to_num_patches(s, self.config.image_grid_pinpoints,
                                                 self.config.vision_config.image_size)
                       for s in sizes]
        else:
            sizes, n_crops = [None] * len(feats), [1] * len(feats)
        total = sum(n_crops)
        for role, r in rows.items():
            if r.shape[0] != total:
                raise AssertionError(f"captured {r.shape[0]} crops for role {role!r}, images have {total}")
        for name, t in (("keys", keys), ("projector input", hidden)):
            if t is not None and t.shape[0] != total:
                raise AssertionError(f"captured {name} for {t.shape[0]} crops, images have {total}")
        start = 0
        for i, (feat, size, n) in enumerate(zip(feats, sizes, n_crops)):
            cls_attn = {role: r[start:start + n, :, 1:] for role, r in rows.items()}  # (n, H, h*w) CLS column dropped
            try:
                im = self._layout(feat, n, size, cls_attn,
                                  # (n, h*w, Dh) CLS dropped
                                  vit_keys=None if keys is None else keys[start:start + n, 1:],
                                  vit_hidden=None if hidden is None else hidden[start:start + n])  # (n, h*w, C)
            except (ValueError, AssertionError) as e:
                where = f"image {i} of {len(feats)} in this batch"
                if size is not None:
                    where += f" (image_sizes (H, W) = {size}, {n} crops)"
                raise type(e)(f"{where}: {e}") from e
            setattr(feat, ENCODED_ATTR, im)
            start += n

    def images(self, enc: Any, input_ids: torch.Tensor, *, layouts: bool = True) -> list[ImageInput]:
        """One image per pooler_output entry (entries repeated by `generate` share one description)."""
        return pooled_images(enc, layouts=layouts)

    def with_features(self, enc: Any, feats: list[torch.Tensor]) -> Any:
        return with_pooler_output(enc, feats)

    # ---------------------------------------------------------------- layout
    def _layout(self, feat: torch.Tensor, n_crops: int, size: tuple[int, int] | None,
                cls_attn: dict[str, torch.Tensor], **features: torch.Tensor | None) -> ImageTokens:
        h, w = self.crop_hw
        n_before = feat.shape[0]
        if not self.is_next:
            if n_before != h * w:
                raise ValueError(f"image has {n_before} rows, expected {h}x{w}")
            return ImageTokens(n_before=n_before, crop_of=torch.zeros(n_before, dtype=torch.long),
                               local_index=torch.arange(n_before), crop_hw=self.crop_hw, n_crops=1, cls_attn=cls_attn,
                               **features)
        crop_of, local, base_region, grid = self._geometry_of(n_crops, size)
        if crop_of.shape[0] != n_before:
            raise AssertionError(f"layout has {crop_of.shape[0]} rows, features have {n_before}")
        return ImageTokens(n_before=n_before, crop_of=crop_of, local_index=local, crop_hw=self.crop_hw,
                           n_crops=n_crops, cls_attn=cls_attn, base_region=base_region, grid_hw=grid, **features)

    def _geometry_of(self, n_crops: int, size: tuple[int, int]) -> tuple[Any, ...]:
        """(crop_of, local_index, base_region, grid_hw) of an image of `size` in `n_crops` crops, computed once
        per size: index tensors through the model's own packing (channel 0 = crop, channel 1 = patch index)."""
        key = (n_crops, tuple(size))
        hit = self._geometry.get(key)
        if hit is not None:
            return hit
        h, w = self.crop_hw
        crop = torch.arange(n_crops, dtype=torch.float64)[:, None].expand(n_crops, h * w)
        patch = torch.arange(h * w, dtype=torch.float64)[None, :].expand(n_crops, h * w)
        fake = torch.stack([crop, patch], dim=-1)  # (n_crops, h*w, 2)
        newline = torch.full((2,), -1.0, dtype=torch.float64)
        packed, _ = self.base.pack_image_features([fake], torch.tensor([size]), "default", image_newline=newline)
        packed = packed[0].round().long()  # (n_before, 2)
        crop_of, local = packed[:, 0], packed[:, 1]
        base_region = grid = None
        if n_crops > 1:
            gh, gw = self._grid(size)
            if gh * gw != n_crops - 1:
                raise AssertionError(f"grid {gh}x{gw} does not match {n_crops - 1} sub-images")
            grid = (gh, gw)
            box = content_box_from_layout(crop_of, local, crop_hw=self.crop_hw, grid_hw=grid)
            base_region = base_region_map(crop_hw=self.crop_hw, grid_hw=grid, content_box=box)
        if len(self._geometry) >= 256:  # many distinct sizes: start over rather than grow without bound
            self._geometry.clear()
        self._geometry[key] = (crop_of, local, base_region, grid)
        return crop_of, local, base_region, grid

    def _grid(self, size: tuple[int, int]) -> tuple[int, int]:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        gh, gw = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints,
                                             self.config.vision_config.image_size)
        return int(gh), int(gw)

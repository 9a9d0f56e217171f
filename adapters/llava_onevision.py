"""Adapter for Hugging Face LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower (no CLS
token), projector, AnyRes-max-N grid, unpadding, bilinear down-sampling of large grids, newline rows.

Where things are taken:
* Scores: forward hooks on `q_proj`/`k_proj` of the chosen SigLIP layers (`ClsRowCapture`); the tower has
  no CLS token (`has_cls = False`), so a method's `score="auto"` is the attention each patch receives
  (mean over all queries, per head), and `score="cls"` is refused.
* New rows (VisionZip, pool): the feature layer's keys and the projector's input, as for LLaVA-NeXT;
  made rows go through the model's own projector.
* Layout: the model's own `pack_image_features` run on index tensors (crop, patch, and the patch's row and
  column in the padded stitched grid of sub-images), with `vision_aspect_ratio` passed explicitly (the
  method's default is "anyres_max_9" whatever the config says).  When the unpadded grid is larger than
  N base grids the model down-samples it bilinearly *after the projector*, so a packed row mixes up to
  four patches.  Rule: every packed row has an **anchor**, the patch nearest to the point it samples
  (its interpolated stitched coordinates, rounded, ties to the lower index); `crop_of` / `local_index`
  name the anchor, and the row's score, keys and projector input are the model's own packing (the
  same bilinear interpolation) of the per-patch scores, keys and projector inputs, stored at the
  anchor's entry.  Down-sampling
  spaces samples more than one patch apart, so anchors are distinct; a crop's anchors form a grid
  (rows × columns of the stitched grid), which `pool` and GlobalCom2 use as the crop's token grid.
  Merged / pooled rows list the packed positions they cover (`new_groups`).
* Multi-image prompts (`batch_num_images` > 1 for a sample): those images are not AnyRes-patched; each is
  one crop plus one newline row, with its own budget; `stats` are in prompt order.
* Video (`pixel_values_videos`, or pre-encoded video features) is refused with a ValueError.
* `image_sizes`, `batch_num_images` and `vision_aspect_ratio` are recorded at each `get_image_features`
  call through the instance-level class swap shared by the HF adapters (`generate` pre-encodes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmdrop.interface import ImageTokens, LLMMethod, VisionMethod
from vlmdrop.ops.anyres import base_region_map, content_box_from_layout

from .base import HFVlmAdapter, ImageInput, Installation, register_adapter
from .hf_vlm import ENCODED_ATTR, pooled_images, with_pooler_output
from .llava import init_llava_family
from .state import EncodeRecord

_NO_DOWNSAMPLING = "anyres_max_1000000"  # a packing that never down-samples: the full-resolution layout


class _RefuseVideo:
    """A top-level pre-hook that refuses video inputs (out of scope for vlmdrop's OneVision support)."""

    def __init__(self, model: nn.Module) -> None:
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True, prepend=True)

    @staticmethod
    def _hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mm = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values_videos") is not None or mm.get("video") is not None:
            raise ValueError(f"vlmdrop: video input (pixel_values_videos) to {type(module).__name__} is not "
                             "supported; pass images (single-image, multi-image or interleaved prompts)")

    def remove(self) -> None:
        self._handle.remove()


@register_adapter
class LlavaOnevisionAdapter(HFVlmAdapter):
    """LLaVA-OneVision on the Hugging Face classes."""

    supported = ("LlavaOnevisionForConditionalGeneration",)
    has_cls = False
    recorded_arg = ("image_sizes", "batch_num_images", "vision_aspect_ratio")

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from transformers import LlavaOnevisionForConditionalGeneration

        return isinstance(model, LlavaOnevisionForConditionalGeneration)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        init_llava_family(self, model, strategy="full", why="SigLIP has no CLS token to remove",
                          vit="a SigLIP-style ViT")

    def install(self, vision: VisionMethod | None, llm: LLMMethod | None, handle: Any,
                **options: Any) -> Installation:
        inst = super().install(vision, llm, handle, **options)
        inst.parts.append(_RefuseVideo(self.model))  # runs first (prepended last)
        return inst

    # -------------------------------------------------------------- encoding
    def encode(self, kw: dict) -> Any:
        """Run the model's own `get_image_features` as its forward would: `LlavaOnevisionModel.forward` does not
        pass the caller's `vision_aspect_ratio` on (transformers 5.24), so the config's applies, here too."""
        return self.base.get_image_features(
            pixel_values=kw["pixel_values"], image_sizes=kw.get("image_sizes"),
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            batch_num_images=kw.get("batch_num_images"), return_dict=True)

    def on_encoded(self, out: Any, args: dict, record: EncodeRecord) -> None:
        """Describe every image of a `get_image_features` call while its inputs are known; the
        `ImageTokens` is attached to the image's feature tensor (`ENCODED_ATTR`)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        feats = list(out.pooler_output)
        image_sizes, per_sample = args.get("image_sizes"), args.get("batch_num_images")
        aspect = args.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision images need image_sizes")
        sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(image_sizes).tolist()]
        patched = [True] * len(sizes) if per_sample is None else [int(n) == 1 for n in per_sample
                                                                  for _ in range(int(n))]
        if len(patched) != len(sizes) or len(feats) != len(sizes):
            raise ValueError(f"batch_num_images={per_sample!r} does not match {len(sizes)} image_sizes "
                             f"and {len(feats)} encoded images")
        n_crops = [image_size_to_num_patches(s, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                   if p else 1 for s, p in zip(sizes, patched)]
        total = sum(n_crops)
        rows, keys, hidden = record.cls_rows, record.keys, record.hidden
        for role, r in rows.items():
            if r.shape[0] != total:
                raise AssertionError(f"captured {r.shape[0]} crops for role {role!r}, images have {total}")
        for name, t in (("keys", keys), ("projector input", hidden)):
            if t is not None and t.shape[0] != total:
                raise AssertionError(f"captured {name} for {t.shape[0]} crops, images have {total}")
        start = 0
        for i, (feat, size, n) in enumerate(zip(feats, sizes, n_crops)):
            try:
                im = self._layout(feat, n, size, aspect,
                                  {role: r[start:start + n] for role, r in rows.items()},  # (n, H, h*w)
                                  vit_keys=None if keys is None else keys[start:start + n],  # (n, h*w, Dh)
                                  vit_hidden=None if hidden is None else hidden[start:start + n])  # (n, h*w, C)
            except (ValueError, AssertionError) as e:
                raise type(e)(f"image {i} of {len(feats)} in this batch (image_sizes (H, W) = {size}, "
                              f"{n} crops): {e}") from e
            setattr(feat, ENCODED_ATTR, im)
            start += n

    def images(self, enc: Any, input_ids: torch.Tensor, *, layouts: bool = True) -> list[ImageInput]:
        """One image per pooler_output entry (entries repeated by `generate` share one description)."""
        return pooled_images(enc, layouts=layouts)

    def with_features(self, enc: Any, feats: list[torch.Tensor]) -> Any:
        return with_pooler_output(enc, feats)

    # ---------------------------------------------------------------- layout
    def _pack(self, per_crop: torch.Tensor, size: tuple[int, int], aspect: str) -> torch.Tensor:
        """(n_crops, h*w, c) per-patch values -> (n_packed, c) through the model's own packing (newline
        rows filled with -1)."""
        newline = torch.full((per_crop.shape[-1],), -1.0, dtype=per_crop.dtype, device=per_crop.device)
        packed, _ = self.base.pack_image_features([per_crop], torch.tensor([size]), image_newline=newline,
                                                  vision_aspect_ratio=aspect)
        return packed[0]

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the AnyRes sub-image grid of an image of `size` (H, W)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        gh, gw = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints,
                                             self.config.vision_config.image_size)
        return int(gh), int(gw)

    def _layout(self, feat: torch.Tensor, n_crops: int, size: tuple[int, int], aspect: str,
                cls_attn: dict[str, torch.Tensor], **features: torch.Tensor | None) -> ImageTokens:
        h, w = self.crop_hw
        n = h * w
        n_before = feat.shape[0]
        if n_crops == 1:  # a multi-image prompt's image: one crop, then one newline row
            if n_before != n + 1:
                raise ValueError(f"image has {n_before} rows, expected {h}x{w} + 1 newline")
            crop_of = torch.cat([torch.zeros(n, dtype=torch.long), torch.tensor([-1])])
            local = torch.cat([torch.arange(n), torch.tensor([-1])])
            return ImageTokens(n_before=n_before, crop_of=crop_of, local_index=local, crop_hw=self.crop_hw,
                               n_crops=1, cls_attn=cls_attn, **features)
        gh, gw = self.grid(size)
        if gh * gw != n_crops - 1:
            raise AssertionError(f"grid {gh}x{gw} does not match {n_crops - 1} sub-images")
        # index tensors: channel 0 = crop, 1 = patch, 2/3 = the patch's row/column in the padded stitched grid
        crop = torch.arange(n_crops, dtype=torch.float64)[:, None].expand(n_crops, n)
        patch = torch.arange(n, dtype=torch.float64)[None, :].expand(n_crops, n)
        sub = (crop - 1).clamp(min=0)
        ys = (sub // gw) * h + patch // w  # (n_crops, h*w)
        xs = (sub % gw) * w + patch % w
        fake = torch.stack([crop, patch, ys, xs], dim=-1)  # (n_crops, h*w, 4)
        packed = self._pack(fake, size, aspect)  # (n_before, 4)
        if packed.shape[0] != n_before:
            raise AssertionError(f"layout has {packed.shape[0]} rows, features have {n_before}")
        layout = packed[:, 0] == -1  # newline rows
        grid_rows = ~layout
        grid_rows[:n] = False  # the base image comes first, never resampled
        # (n_before,) anchors: the nearest patch, ties (up to float64 noise of the interpolation) to the lower index
        ay, ax = (packed[:, 2] - 0.5 - 1e-9).ceil().long(), (packed[:, 3] - 0.5 - 1e-9).ceil().long()
        crop_of = torch.full((n_before,), -1, dtype=torch.long)
        local = torch.full((n_before,), -1, dtype=torch.long)
        crop_of[:n], local[:n] = 0, torch.arange(n)
        crop_of[grid_rows] = 1 + (ay[grid_rows] // h) * gw + ax[grid_rows] // w
        local[grid_rows] = (ay[grid_rows] % h) * w + ax[grid_rows] % w
        # the full-resolution unpadded layout (never down-sampled): whether the model resampled, and the content box
        full = self._pack(fake, size, _NO_DOWNSAMPLING).round().long()  # (n_full, 4)
        resampled = full.shape[0] != n_before
        if resampled:
            pairs = crop_of[grid_rows] * n + local[grid_rows]
            if pairs.unique().numel() != pairs.numel():
                raise AssertionError("two down-sampled rows share an anchor patch")
            rows = grid_rows.nonzero(as_tuple=True)[0]  # (m,) positions of the grid rows
            at = (crop_of[rows], local[rows])

            def repack(t: torch.Tensor | None, heads_first: bool) -> torch.Tensor | None:
                """Per-patch values with each down-sampled row's interpolated value at its anchor."""
                if t is None:
                    return None
                per_patch = t.transpose(1, 2) if heads_first else t  # (n_crops, h*w, c)
                vals = self._pack(per_patch.float(), size, aspect)[rows.to(t.device)]  # (m, c)
                out = per_patch.clone()
                out[at[0].to(t.device), at[1].to(t.device)] = vals.to(out.dtype)
                return out.transpose(1, 2) if heads_first else out

            cls_attn = {role: repack(r, True) for role, r in cls_attn.items()}  # (n_crops, H, h*w)
            features = {k: repack(v, False) for k, v in features.items()}  # (n_crops, h*w, c)
        # the content box of the full-resolution grid (not the anchors', which may skip its border)
        box = content_box_from_layout(full[:, 0], full[:, 1], crop_hw=self.crop_hw, grid_hw=(gh, gw))
        base_region = base_region_map(crop_hw=self.crop_hw, grid_hw=(gh, gw), content_box=box)
        return ImageTokens(n_before=n_before, crop_of=crop_of, local_index=local, crop_hw=self.crop_hw,
                           n_crops=n_crops, cls_attn=cls_attn, base_region=base_region, grid_hw=(gh, gw),
                           **features)

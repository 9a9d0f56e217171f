"""Adapter for Hugging Face InternVL 2/2.5/3 (`InternVLForConditionalGeneration`): dynamic tiling with
the thumbnail last, a CLS ViT, pixel shuffle, MLP projector.

Where things are taken:
* Tokens are dropped **after the projector**: pixel shuffle needs every tile's full square grid.  A
  post-shuffle token is scored by pooling its source patches (the sum of their CLS attention; the
  source map is the model's own `pixel_shuffle` run on index tensors).
* CLS rows: forward hooks on the ViT layer's `q_norm`/`k_norm` (they follow `q_proj`/`k_proj`, and are
  `nn.Identity` without qk-norm), so the scores use the queries/keys the layer really attends with.
* Tiles per image: the model receives only the stacked tiles; each image's tile count comes from its
  run of `<IMG_CONTEXT>` placeholders (`<img>…</img>`), `image_seq_length` tokens per tile.  An image
  with more than one tile is a `rows × cols` raster of tiles followed by the thumbnail (the whole
  picture resized to one tile).  The grid shape is not passed to the model, so it is recovered from
  the pixels: of the factorisations rows·cols = tiles − 1, the one whose stitched tiles, area-resized
  to one tile, are closest (MSE) to the thumbnail.
* `generate` encodes the images before the first forward, so the base model's class is swapped on this
  instance only (restored by `remove()`) for a subclass whose `get_image_features` reports its pixels
  and output, as in `adapters/llava.py`.
* New rows (VisionZip, `pool`), per tile: they are formed in the projector's *input* space -- the
  post-shuffle, pre-projector features (each the concatenation of its 2×2 source patches' features,
  4·C channels), captured by a pre-hook on `multi_modal_projector` (`FeatureCapture`) -- and mapped to
  the LLM's space by the model's own projector (`project`).  `ImageTokens.vit_hidden` is
  (tiles, N', 4·C) and `vit_keys` (tiles, N', Dh): the feature layer's keys (the `k_norm` output, the
  keys it attends with), averaged over heads, then averaged over each post-shuffle token's 2×2 source
  patches; both in the post-shuffle raster order of `local_index` / `cls_attn`.
* LLM stage (FastV, PyramidDrop): `adapters/llm_stage.py` on the Qwen2/Llama decoder; the tiles are
  grouped into images by the same placeholder runs (`images(..., layouts=False)`), so scores, budgets and stats are
  per image, not per tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmdrop.interface import ImageTokens
from vlmdrop.ops.anyres import base_region_map
from vlmdrop.ops.tiles import (
    infer_tile_grid,
    patch_ids,
    pool_patch_features,
    pool_patch_scores,
    shuffle_source_map,
    to_raster,
)

from .base import HFVlmAdapter, ImageInput, register_adapter
from .hf_vlm import ENCODED_ATTR, feature_layer_index
from .state import EncodeRecord


@dataclass(frozen=True)
class EncodedTiles:
    """What one `get_image_features` call learned about its T tiles (attached to its output).

    Attributes:
        n_tiles: T, the tiles encoded.
        pixels: (T, 3, S, S) their pixel_values (for the tile grid), or None.
        cls_rows: role -> (T, H, N') CLS rows pooled onto the post-shuffle grid, raster order.
        keys: (T, N', Dh) pooled feature-layer keys, or None.
        hidden: (T, N', 4C) post-shuffle projector input in raster order, or None.
    """

    n_tiles: int
    pixels: torch.Tensor | None
    cls_rows: dict[str, torch.Tensor]
    keys: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def take(self, src: torch.Tensor) -> EncodedTiles:
        """The same for the tiles `src` (T',) index (generate's k-fold expansion)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[src.to(t.device)]

        return EncodedTiles(n_tiles=int(src.numel()), pixels=pick(self.pixels),
                            cls_rows={r: pick(p) for r, p in self.cls_rows.items()}, keys=pick(self.keys),
                            hidden=pick(self.hidden))


@register_adapter
class InternVLAdapter(HFVlmAdapter):
    """InternVL 2/2.5/3 on the Hugging Face `InternVLForConditionalGeneration` class."""

    supported = ("InternVLForConditionalGeneration",)
    attention_attr = "attention"
    qk_names = ("q_norm", "k_norm")  # identity without qk-norm: the queries / keys the layer attends with
    recorded_arg = "pixel_values"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from transformers import InternVLForConditionalGeneration

        return isinstance(model, InternVLForConditionalGeneration)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.base = model.model
        self.config = model.config
        try:
            self.layers = list(self.base.vision_tower.encoder.layer)
        except AttributeError as e:
            raise ValueError(f"vision tower {type(self.base.vision_tower).__name__} has no encoder.layer; "
                             "vlmdrop expects InternVL's ViT") from e
        attn = self.layers[0].attention
        self.num_heads, self.scale = attn.num_heads, attn.scale
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={self.config.vision_feature_select_strategy!r}: "
                             "vlmdrop supports 'default' (CLS removed) only")
        self.feature_layer = feature_layer_index(self.config.vision_feature_layer, len(self.layers))
        vcfg = self.config.vision_config
        (ih, iw), (ph, pw) = vcfg.image_size, vcfg.patch_size
        self.patch_hw = (ih // ph, iw // pw)
        self.sources, self.local_index, self.crop_hw = self._shuffle_map()
        self.tokens_per_tile = self.sources.shape[0]
        self.image_token_id = self.config.image_token_id
        pad = getattr(self.config.text_config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else 0

    def _shuffle_map(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """`shuffle_source_map` of the model's own `pixel_shuffle` run on the patch ids."""
        shuffled = self.base.pixel_shuffle(patch_ids(*self.patch_hw),
                                           scale_factor=self.config.downsample_ratio)  # (1, h', w', k)
        return shuffle_source_map(shuffled, patch_hw=self.patch_hw)

    # -------------------------------------------------------------- encoding
    def encode(self, kw: dict) -> Any:
        """Run the model's own `get_image_features` as its forward would."""
        return self.base.get_image_features(pixel_values=kw["pixel_values"],
                                            vision_feature_layer=kw.get("vision_feature_layer"),
                                            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
                                            return_dict=True)

    def on_encoded(self, out: Any, pixel_values: torch.Tensor | None, record: EncodeRecord) -> None:
        """Attach the tiles' pixels, pooled CLS rows and (for new rows) pooled keys and post-shuffle
        features to the encoder output (`ENCODED_ATTR`, an `EncodedTiles`), for the forward that consumes
        them.  On the output object, not on its (T, N', D) tensor: `generate(num_beams=k)` /
        `num_return_sequences` replace that tensor, in place on the object, by each sample's tiles
        repeated k times."""
        rows, keys, hidden = record.cls_rows, record.keys, record.hidden
        feats = out.pooler_output  # (T, N', D)
        n_tiles = feats.shape[0]
        pooled = {}
        for role, r in rows.items():
            if r.shape[0] != n_tiles:
                raise AssertionError(f"captured {r.shape[0]} tiles for role {role!r}, features have {n_tiles}")
            # (T, H, N'): CLS column dropped, 2x2 sources summed, post-shuffle raster order
            pooled[role] = pool_patch_scores(r[:, :, 1:], self.sources, self.local_index)
        for name, t in (("keys", keys), ("projector input", hidden)):
            if t is not None and t.shape[0] != n_tiles:
                raise AssertionError(f"captured {name} for {t.shape[0]} tiles, features have {n_tiles}")
        if keys is not None:
            if keys.shape[1] - 1 != self.patch_hw[0] * self.patch_hw[1]:
                raise AssertionError(f"keys have {keys.shape[1] - 1} patches per tile, expected "
                                     f"{self.patch_hw[0]}x{self.patch_hw[1]}")
            keys = pool_patch_features(keys[:, 1:], self.sources, self.local_index)  # (T, N', Dh) CLS row dropped
        if hidden is not None:
            if hidden.shape[1] != self.tokens_per_tile:
                raise AssertionError(f"projector input has {hidden.shape[1]} tokens per tile, "
                                     f"expected {self.tokens_per_tile}")
            hidden = to_raster(hidden, self.local_index)  # (T, N', 4C) post-shuffle raster order
        setattr(out, ENCODED_ATTR, EncodedTiles(n_tiles=n_tiles, pixels=pixel_values, cls_rows=pooled, keys=keys,
                                                hidden=hidden))

    def images(self, enc: Any, input_ids: torch.Tensor, *, layouts: bool = True) -> list[ImageInput]:
        """Per-image visual rows (and `ImageTokens`), grouping tiles by the placeholder runs of `input_ids`."""
        feats = enc.pooler_output  # (T, N', D)
        if not layouts:  # the LLM stage: each image's run of placeholders (tiles x tokens per tile)
            runs = self._placeholder_runs(input_ids)
            n_rows = int(feats.shape[0]) * int(feats.shape[1])
            if sum(runs) != n_rows:
                raise ValueError(f"the placeholders describe {sum(runs)} visual rows ({runs} per image) but the "
                                 f"image features hold {n_rows} rows")
            flat = feats.reshape(n_rows, feats.shape[-1])  # (T*N', D)
            return [ImageInput(rows=r, tokens=None) for r in torch.split(flat, runs)]
        encoded = getattr(enc, ENCODED_ATTR, None)
        if encoded is None:
            raise ValueError("these image features were not encoded while vlmdrop was applied "
                             "(pass pixel_values, or call generate, with the method applied)")
        counts = self._tiles_per_image(input_ids)
        if sum(counts) != feats.shape[0]:
            raise ValueError(f"the placeholders describe {sum(counts)} tiles ({counts} per image) but "
                             f"pixel_values hold {feats.shape[0]} tiles")
        if feats.shape[0] != encoded.n_tiles:  # expanded by generate: map each tile back to the encoded one
            encoded = encoded.take(self._expanded_tiles(input_ids, encoded.n_tiles))
        out, start = [], 0
        for n in counts:
            grid = None
            if n > 1:
                if encoded.pixels is None:
                    raise ValueError("vlmdrop needs the tiles' pixel_values to recover an InternVL image's tile grid")
                grid = infer_tile_grid(encoded.pixels[start:start + n - 1], encoded.pixels[start + n - 1])
            tile = slice(start, start + n)
            im = self._layout(n, {r: p[tile] for r, p in encoded.cls_rows.items()}, grid,
                              vit_keys=None if encoded.keys is None else encoded.keys[tile],  # (n, N', Dh)
                              vit_hidden=None if encoded.hidden is None else encoded.hidden[tile])  # (n, N', 4C)
            rows = feats[tile].reshape(n * self.tokens_per_tile, feats.shape[-1])  # (n*N', D)
            out.append(ImageInput(rows=rows, tokens=im))
            start += n
        return out

    def _expanded_tiles(self, input_ids: torch.Tensor, n_encoded: int) -> torch.Tensor:
        """(T',) encoded tile of each tile after `generate` expanded a batch k-fold: rows repeated
        (row b comes from row b // k) and each row's tiles repeated as a group ([A, B] -> [A, B, A, B],
        `GenerationMixin._expand_multimodal_outputs`), k = T' / T."""
        per_row = []
        for row in input_ids:  # tiles of each row, from its placeholder runs
            per_row.append(sum(self._tiles_per_image(row[None])))
        n_now = sum(per_row)
        if n_encoded == 0 or n_now % n_encoded or len(per_row) % (n_now // n_encoded):
            raise ValueError(f"the input holds {n_now} tiles in {len(per_row)} rows but {n_encoded} tiles were "
                             "encoded; vlmdrop follows only generate's k-fold expansion (num_beams, "
                             "num_return_sequences)")
        k = n_now // n_encoded
        src, start = [], 0
        for b in range(0, len(per_row), k):  # one encoded row, now k equal rows
            if len(set(per_row[b:b + k])) != 1:
                raise ValueError(f"rows {b}..{b + k - 1} should be copies of one row but hold {per_row[b:b + k]} tiles")
            group = torch.arange(start, start + per_row[b])
            src.extend([group] * k)
            start += per_row[b]
        return torch.cat(src) if src else torch.zeros(0, dtype=torch.long)

    def _placeholder_runs(self, input_ids: torch.Tensor) -> list[int]:
        """Length of each image's run of placeholders (`<img>…</img>`), in batch/prompt order."""
        runs = []
        for row in (input_ids == self.image_token_id):  # (L,)
            pos = row.nonzero(as_tuple=True)[0]  # (n,)
            if pos.numel() == 0:
                continue
            breaks = (pos[1:] - pos[:-1] != 1).nonzero(as_tuple=True)[0] + 1
            runs.extend(int(run.numel()) for run in torch.tensor_split(pos, breaks.cpu()))
        return runs

    def _tiles_per_image(self, input_ids: torch.Tensor) -> list[int]:
        """Tiles of each image in batch/prompt order, from the runs of image placeholders."""
        counts = []
        for n in self._placeholder_runs(input_ids):
            if n % self.tokens_per_tile:
                raise ValueError(f"a run of {n} image placeholders is not a multiple of the "
                                 f"{self.tokens_per_tile} tokens per tile")
            counts.append(n // self.tokens_per_tile)
        return counts

    def with_features(self, enc: Any, feats: list[torch.Tensor]) -> Any:
        new = type(enc)(**{k: v for k, v in enc.items()})
        new.pooler_output = torch.cat(feats)[None]  # (1, n_kept_total, D): the model only needs the row count
        return new

    # ---------------------------------------------------------------- layout
    def _layout(self, n: int, cls_attn: dict[str, torch.Tensor], grid: tuple[int, int] | None,
                **features: torch.Tensor | None) -> ImageTokens:
        hh, ww = self.crop_hw
        per = self.tokens_per_tile
        crop_of = torch.arange(n).repeat_interleave(per)  # (n*N',) tiles in processor order, thumbnail last
        local = self.local_index.repeat(n)  # (n*N',)
        base_region = None
        if grid is not None:
            base_region = base_region_map(crop_hw=self.crop_hw, grid_hw=grid,
                                          content_box=(0, 0, grid[0] * hh, grid[1] * ww))
        return ImageTokens(n_before=n * per, crop_of=crop_of, local_index=local, crop_hw=self.crop_hw, n_crops=n,
                           cls_attn=cls_attn, base_region=base_region, base_crop=n - 1 if n > 1 else 0, grid_hw=grid,
                           **features)

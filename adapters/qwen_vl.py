"""Adapters for Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) and Qwen3-VL
(`Qwen3VLForConditionalGeneration`), and Qwen3.5's vision stage (`Qwen3_5ForConditionalGeneration`,
Qwen3-VL's vision path without DeepStack; no LLM-stage methods on its hybrid linear-attention LLM): a CLS-free
ViT over native-resolution patches, a 2x2 merger (four patches -> one LLM token), M-RoPE positions, and for
Qwen3-VL DeepStack features.

Where things are taken:
* Tokens are dropped **after the merger**: each image is one crop, its LLM-token grid (h/2 x w/2 of its
  `image_grid_thw`) in raster order, the order of its placeholders.  No AnyRes tiling: HiRED gives the whole
  budget to that crop (its `alpha` split has no sub-images to act on) and keeps the top tokens by score;
  GlobalCom2 likewise keeps its top tokens.
* Scores (no CLS token): the attention each patch *receives* at a ViT block, averaged over the queries of its
  own image, per head (`vlmdrop.kernels.attention_received`, streaming: no N x N matrix), from the block's
  fused `qkv` output (forward hook) with the vision RoPE the block applies (its `position_embeddings`, taken by
  a pre-hook on its attention, which also gives `cu_seqlens`, one segment per image at a full-attention block).
  A LLM token's score is the sum over its 2x2 source patches.  Every role ("first", "feature", "score") gets
  this score, also GlobalCom2's logit role.  Qwen2.5-VL attends within windows except in
  `fullatt_block_indexes`: a role whose layer is a window block is scored at the next full-attention block
  (or the last one before it when none follows).  Qwen3-VL attends fully in every block.
* Which LLM token a ViT row feeds: the model's own window permutation (`get_vision_window_index`,
  `permute_input_for_window_attn`) run on patch indices, then the merger's order (rows 4j..4j+3 -> merged
  row j -> LLM token `window_index[j]` after the model's un-permutation); patches arrive block-major over the
  2x2 merge blocks, so patch p feeds token p // 4.  Qwen3-VL has no permutation.
* New rows (VisionZip, `pool`): formed in the merger's input space -- each LLM token's 4 normalised patch
  features concatenated (`ln_q` / `norm` output viewed as (n, 4C)), captured by a pre-hook on the merger --
  and mapped to the LLM by the rest of the merger (`project`).  `vit_keys`: the feature layer's keys (before
  RoPE) averaged over heads and over each token's 4 patches.
* Positions: M-RoPE (3-D) positions of the uncompacted prompt (the caller's `position_ids`, as `generate`
  passes them, or the model's own `compute_3d_position_ids`), gathered at the kept tokens: every kept token
  keeps its position, and the text after an image keeps the position the unmodified model gives it; a new row
  takes the position of the first token it summarises (VisionZip: its target).  Decode steps keep the
  unmodified model's positions (those `generate` passes, or the ones the model derives from its
  `rope_deltas`).  LLM-stage methods: `positions="original"` only (renumbering 3-D positions contiguously has
  no meaning: text after an image would fall inside the image's grid).
* Qwen3-VL DeepStack: the DeepStack rows of each image are kept at exactly the kept rows (a new row gets the
  mean of the DeepStack rows it summarises); with an LLM-stage method the engine adds them itself at the slots
  the surviving visual tokens hold (`adapters/llm_stage.py`).
* Videos (`pixel_values_videos`, video encoder outputs) are refused with a ValueError.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, ClassVar

import torch
from torch import nn

from vlmdrop.interface import ImageTokens, LLMMethod, VisionMethod
from vlmdrop.kernels import attention_received
from vlmdrop.ops.attention import resolve_score

from .base import HFVlmAdapter, ImageInput, Installation, register_adapter
from .hf_vlm import ENCODED_ATTR, pooled_images, with_pooler_output
from .state import EncodeRecord
from .vision_capture import Recorder

logger = logging.getLogger("vlmdrop")


class ReceivedCapture(Recorder):
    """Records, per role, the attention each row of a Qwen ViT block receives (`EncodeRecord.cls_rows[role]`,
    (H, S) float32 in the block's row order, each image's columns summing to 1 per head), and optionally the
    feature block's keys (`EncodeRecord.keys`, (S, Dh) before RoPE, mean over heads) and the merger's input
    (`EncodeRecord.hidden`, (S / 4, 4C) normalised, in merged-row order).

    Args:
        blocks: role -> ViT block (`attn` with a fused `qkv` linear, `num_heads`, `scaling`).
        keys_block: the block whose keys to record, or None.
        merger: the merger whose normalised input to record, or None; `merger_input(x)` normalises it.
    """

    def __init__(self, blocks: dict[str, nn.Module], *, keys_block: nn.Module | None = None,
                 merger: nn.Module | None = None, merger_input: Any = None) -> None:
        super().__init__()  # thread-local .record, plus .pending: role -> (cu_seqlens, (cos, sin))
        self.merger_input = merger_input
        targets: dict[nn.Module, list[str]] = {}
        for role, blk in blocks.items():
            targets.setdefault(blk, []).append(role)
        if keys_block is not None:
            targets.setdefault(keys_block, [])
        for blk, roles in targets.items():
            attn = blk.attn
            if not isinstance(getattr(attn, "qkv", None), nn.Linear):
                raise TypeError(f"{type(attn).__name__} has no fused qkv linear; cannot score a Qwen ViT block")
            want_keys = blk is keys_block
            self.handles.append(attn.register_forward_pre_hook(self._on_attn(attn), with_kwargs=True))
            self.handles.append(attn.qkv.register_forward_hook(self._on_qkv(attn, tuple(roles), want_keys)))
        if merger is not None:
            self.handles.append(merger.register_forward_pre_hook(self._on_merger))

    def begin(self, record: EncodeRecord) -> None:
        super().begin(record)
        self._local.pending = {}

    def end(self) -> None:
        super().end()
        self._local.pending = {}

    def _on_attn(self, attn: nn.Module):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.record() is None:
                return
            cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            emb = kwargs.get("position_embeddings")
            if cu is None or emb is None:
                raise ValueError(f"{type(module).__name__} was called without cu_seqlens / position_embeddings; "
                                 "vlmdrop scores Qwen ViT blocks from them")
            self._local.pending[id(module)] = (cu, emb)

        return hook

    def _on_qkv(self, attn: nn.Module, roles: tuple[str, ...], want_keys: bool):
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision  # the block's own vision RoPE

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            rec = self.record()
            if rec is None:
                return
            cu, (cos, sin) = self._local.pending.pop(id(attn))
            s = out.shape[0]
            qkv = out.detach().reshape(s, 3, attn.num_heads, -1)  # (S, 3, H, Dh)
            q, k = qkv[:, 0], qkv[:, 1]  # (S, H, Dh) each
            if want_keys:
                rec.keys = k.float().mean(dim=1)  # (S, Dh) before RoPE
            if not roles:
                return
            q, k = rope(q, k, cos, sin)  # (S, H, Dh): what the block attends with
            bounds = [int(v) for v in cu.tolist()]
            parts = []
            for a, b in zip(bounds[:-1], bounds[1:]):  # one segment per image (per window at a window block)
                qs = q[a:b].transpose(0, 1)[None]  # (1, H, n, Dh)
                ks = k[a:b].transpose(0, 1)[None]
                parts.append(attention_received(qs, ks, scale=float(attn.scaling), causal=False)[0])  # (H, n)
            received = torch.cat(parts, dim=1)  # (H, S)
            for role in roles:
                rec.cls_rows[role] = received

        return hook

    def _on_merger(self, module: nn.Module, args: tuple) -> None:
        rec = self.record()
        if rec is not None and args:
            rec.hidden = self.merger_input(args[0].detach())  # (S / 4, 4C)


class _QwenVLAdapter(HFVlmAdapter):
    """What Qwen2.5-VL and Qwen3-VL share (see the module docstring)."""

    attention_attr = "attn"
    recorded_arg = "image_grid_thw"
    vision_positions = "original"
    #: no CLS token: a method's score="auto" is the attention received; score="cls" is refused
    has_cls: ClassVar[bool] = False
    model_class: ClassVar[str] = ""

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        import transformers

        klass = getattr(transformers, cls.model_class, None)
        return klass is not None and isinstance(model, klass)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.base = model.model
        self.config = model.config
        self.visual = self.base.visual
        self.layers = list(self.visual.blocks)
        attn = self.layers[0].attn
        self.num_heads, self.scale = int(attn.num_heads), float(attn.scaling)
        self.feature_layer = len(self.layers) - 1  # the merger reads the last block's output
        self.merge = int(self.visual.spatial_merge_size)
        if self.merge != 2:
            raise ValueError(f"spatial_merge_size={self.merge}: vlmdrop supports Qwen's 2x2 merger")
        self.image_token_id = int(self.config.image_token_id)
        pad = getattr(self.config.text_config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else 0

    # ---------------------------------------------------------------- options
    def install(self, vision: VisionMethod | None, llm: LLMMethod | None, handle: Any,
                **options: Any) -> Installation:
        if llm is not None and llm.positions != "original":
            raise ValueError(f"positions={llm.positions!r}: {type(self.model).__name__} uses 3-D M-RoPE positions, "
                             "which have no contiguous renumbering (text after an image would fall inside the "
                             "image's grid); use positions='original'")
        return super().install(vision, llm, handle, **options)

    def check_inputs(self, kw: dict) -> None:
        mm = kw.get("mm_encoder_outputs") or {}
        if kw.get("pixel_values_videos") is not None or mm.get("video") is not None:
            raise ValueError(f"vlmdrop does not support video inputs on {type(self.model).__name__} "
                             "(pixel_values_videos); pass images, or remove the method for videos")

    # ------------------------------------------------------------------ ViT
    def full_attention_blocks(self) -> list[int]:
        """ViT blocks attending over each whole image."""
        return list(range(len(self.layers)))

    def score_block(self, layer: int) -> int:
        """The block whose received attention scores `layer`: itself at a full-attention block, else the next
        full-attention block (the last one before it when none follows)."""
        full = self.full_attention_blocks()
        if layer in full:
            return layer
        after = [i for i in full if i > layer]
        chosen = after[0] if after else max(i for i in full if i < layer)
        logger.info("ViT block %d attends within windows; vlmdrop scores it at full-attention block %d",
                    layer, chosen)
        return chosen

    def captures(self, vision: VisionMethod) -> list[Any]:
        resolve_score(vision.score, has_cls=self.has_cls,  # "auto" / "received": the attention received
                      tower=f"vision tower of {type(self.model).__name__}")
        roles = vision.vit_layers(len(self.layers), self.feature_layer)
        needs = set(vision.config.needs)
        return [ReceivedCapture({r: self.layers[self.score_block(i)] for r, i in roles.items()},
                                keys_block=self.layers[self.feature_layer] if "vit_keys" in needs else None,
                                merger=self.visual.merger if "vit_hidden" in needs else None,
                                merger_input=self.merger_input)]

    def merger_input(self, x: torch.Tensor) -> torch.Tensor:
        """(S, C) merger input -> (S / 4, 4C): each merged row's four normalised patch features."""
        raise NotImplementedError

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """(S / 4,) the ViT's window order of the merged rows (None: no permutation)."""
        return None

    def row_tokens(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(S,) the LLM token (over all images of the encode, in their order) each ViT block row feeds."""
        s = int(grid_thw.prod(-1).sum())
        patch = torch.arange(s, dtype=torch.float64)[:, None]  # (S, 1) patch ids in the processor's order
        widx = self.window_index(grid_thw)
        if widx is not None:  # the model's own permutation, run on the ids
            patch = self.visual.permute_input_for_window_attn(patch, widx.cpu(), seq_len=s)
        return patch[:, 0].round().long() // (self.merge * self.merge)  # block-major: patch p feeds token p // 4

    def merged_tokens(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(S / 4,) the LLM token each merged row (merger output before un-permutation) becomes."""
        widx = self.window_index(grid_thw)
        n = int(grid_thw.prod(-1).sum()) // (self.merge * self.merge)
        return widx.cpu().long() if widx is not None else torch.arange(n)

    # -------------------------------------------------------------- encoding
    def encode(self, kw: dict) -> Any:
        return self.base.get_image_features(kw["pixel_values"], kw.get("image_grid_thw"), return_dict=True)

    def on_encoded(self, out: Any, grid_thw: torch.Tensor | None, record: EncodeRecord) -> None:
        """Attach each image's `ImageTokens` (pooled scores, keys and merger input on its LLM-token grid) to
        its tensor of `pooler_output` (`ENCODED_ATTR`); `generate` repeats those tensors for beams."""
        if grid_thw is None:
            raise ValueError("Qwen-VL images need image_grid_thw")
        grid = torch.as_tensor(grid_thw).cpu().long()  # (I, 3)
        if bool((grid[:, 0] != 1).any()):
            raise ValueError(f"image_grid_thw {grid.tolist()}: vlmdrop supports still images (t = 1)")
        feats = list(out.pooler_output)
        unit = self.merge * self.merge
        counts = [int(t * h * w) // unit for t, h, w in grid.tolist()]
        if [int(f.shape[0]) for f in feats] != counts:
            raise AssertionError(f"images have {[int(f.shape[0]) for f in feats]} rows, image_grid_thw gives {counts}")
        n_tok = sum(counts)
        tok = self.row_tokens(grid)  # (S,)
        pooled: dict[str, torch.Tensor] = {}
        for role, r in record.cls_rows.items():  # (H, S) -> (H, n_tok): sum over each token's 4 patches
            if r.shape[1] != tok.numel():
                raise AssertionError(f"captured {r.shape[1]} ViT rows for role {role!r}, the images have {tok.numel()}")
            pooled[role] = torch.zeros(r.shape[0], n_tok, dtype=r.dtype, device=r.device).index_add_(
                1, tok.to(r.device), r)
        keys = record.keys
        if keys is not None:  # (S, Dh) -> (n_tok, Dh): mean over each token's 4 patches
            keys = torch.zeros(n_tok, keys.shape[1], dtype=keys.dtype, device=keys.device).index_add_(
                0, tok.to(keys.device), keys) / unit
        hidden = record.hidden
        if hidden is not None:  # (S/4, 4C) merged-row order -> LLM-token order
            order = self.merged_tokens(grid).to(hidden.device)
            hidden = torch.empty_like(hidden).index_copy_(0, order, hidden)
        start = 0
        for feat, (_, h, w), n in zip(feats, grid.tolist(), counts):
            part = slice(start, start + n)
            hh, ww = h // self.merge, w // self.merge
            im = ImageTokens(n_before=n, crop_of=torch.zeros(n, dtype=torch.long), local_index=torch.arange(n),
                             crop_hw=(hh, ww), n_crops=1, cls_attn={r: p[None, :, part] for r, p in pooled.items()},
                             vit_keys=None if keys is None else keys[None, part],  # (1, n, Dh)
                             vit_hidden=None if hidden is None else hidden[None, part])  # (1, n, 4C)
            setattr(feat, ENCODED_ATTR, im)
            start += n

    def images(self, enc: Any, input_ids: torch.Tensor, *, layouts: bool = True) -> list[ImageInput]:
        return pooled_images(enc, layouts=layouts)

    def with_features(self, enc: Any, rows: list[torch.Tensor]) -> Any:
        return with_pooler_output(enc, tuple(rows))

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------- positions
    def prefill_positions(self, kw: dict) -> torch.Tensor:
        """The caller's `position_ids` (`generate`: (4, B, L)), else the model's own M-RoPE positions of the
        uncompacted prompt (`compute_3d_position_ids`, which also sets the model's `rope_deltas` as the
        unmodified forward does), else the 1-D positions the language model would fall back to."""
        pos = kw.get("position_ids")
        if pos is not None:
            return pos
        input_ids = kw["input_ids"]
        emb = torch.empty(*input_ids.shape, 0, device=input_ids.device)  # only its shape is read
        pos = self.base.compute_3d_position_ids(
            input_ids=input_ids, image_grid_thw=kw.get("image_grid_thw"), video_grid_thw=kw.get("video_grid_thw"),
            inputs_embeds=emb, attention_mask=kw.get("attention_mask"), cache=kw.get("cache"),
            mm_token_type_ids=kw.get("mm_token_type_ids"))
        if pos is None:  # no mm_token_type_ids: the language model's own fallback, arange(L) on three rows
            b, length = input_ids.shape
            pos = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, b, -1)
        return pos

    def decode_positions(self, kw: dict, *, past: int, q_len: int, rope_deltas: Any) -> torch.Tensor:
        """As the model's `compute_3d_position_ids` at a cached step, on the caller's (uncompacted) sequence."""
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        b = x.shape[0]
        mask = kw.get("attention_mask")
        if mask is not None:
            pos = mask.long().cumsum(-1) - 1
            pos = pos.masked_fill(mask == 0, 0)[:, -q_len:]  # (B, q)
        else:
            pos = torch.arange(past, past + q_len, device=x.device)[None].expand(b, -1)  # (B, q)
        pos = pos[None].expand(3, -1, -1).to(x.device)  # (3, B, q)
        if rope_deltas is None:
            return pos
        delta = rope_deltas.repeat_interleave(b // rope_deltas.shape[0], dim=0)  # (B, 1)
        return pos + delta.to(pos.device)


@register_adapter
class Qwen2_5_VLAdapter(_QwenVLAdapter):
    """Qwen2.5-VL: windowed ViT (full attention in `fullatt_block_indexes`), window-permuted patches."""

    supported = ("Qwen2_5_VLForConditionalGeneration",)
    model_class = "Qwen2_5_VLForConditionalGeneration"

    def full_attention_blocks(self) -> list[int]:
        full = sorted(int(i) for i in self.visual.fullatt_block_indexes)
        if not full:
            raise ValueError("fullatt_block_indexes is empty: no ViT block attends over whole images to score")
        return full

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        widx, _ = get_vision_window_index(grid_thw, spatial_merge_size=self.merge,
                                          window_size=self.visual.window_size, patch_size=self.visual.patch_size)
        return widx

    def merger_input(self, x: torch.Tensor) -> torch.Tensor:
        m = self.visual.merger
        return m.ln_q(x).view(-1, m.hidden_size)  # (S/4, 4C)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        return self.visual.merger.mlp(rows)  # (n, 4C) -> (n, D)


@register_adapter
class Qwen3VLAdapter(_QwenVLAdapter):
    """Qwen3-VL: full-attention ViT, DeepStack features kept at the kept rows."""

    supported = ("Qwen3VLForConditionalGeneration",)
    model_class = "Qwen3VLForConditionalGeneration"

    def merger_input(self, x: torch.Tensor) -> torch.Tensor:
        m = self.visual.merger
        if m.use_postshuffle_norm:
            return m.norm(x.view(-1, m.hidden_size))
        return m.norm(x).view(-1, m.hidden_size)  # (S/4, 4C)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        m = self.visual.merger
        return m.linear_fc2(m.act_fn(m.linear_fc1(rows)))  # (n, 4C) -> (n, D)

    def keep_features(self, enc: Any, rows: list[torch.Tensor], selections: list[Any]) -> Any:
        """The kept rows, and every DeepStack layer's rows at exactly the same kept positions (a new row: the
        mean of the DeepStack rows of the positions it summarises)."""
        new = self.with_features(enc, rows)
        layers = getattr(enc, "deepstack_features", None)
        if layers is None:
            return new
        kept_layers = []
        for per_image in layers:  # one layer: a (n_before, D) tensor per image
            if len(per_image) != len(selections):
                raise AssertionError(f"DeepStack features of {len(per_image)} images, {len(selections)} selected")
            out = []
            for ds, sel in zip(per_image, selections):
                part = ds[sel.kept_indices.to(ds.device)]  # (n_kept - n_new, D)
                if sel.n_new:
                    groups = sel.new_groups or []
                    made = torch.stack([ds[g.to(ds.device)].mean(dim=0) for g in groups])  # (n_new, D)
                    part = torch.cat([part, made])
                out.append(part)
            kept_layers.append(tuple(out))
        new.deepstack_features = kept_layers
        return new


@register_adapter
class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3.5: Qwen3-VL's vision path (no DeepStack), so every vision-stage method; its LLM alternates Gated
    DeltaNet linear-attention and full-attention layers, so the LLM-stage methods (which rebuild the attention
    of every layer after the drop) are refused."""

    supported = ("Qwen3_5ForConditionalGeneration",)
    model_class = "Qwen3_5ForConditionalGeneration"
    supports_llm_stage = False


__all__ = ["Qwen2_5_VLAdapter", "Qwen3VLAdapter", "Qwen3_5Adapter", "ReceivedCapture"]

"""Adapter for open_clip's `VisionTransformer` (the `.visual` tower of `open_clip.create_model(...)`).

`vlmdrop.apply(clip_model, "hired" | "visionzip" | "random" | "pool", budget=..., layer=L)` makes the
tower drop patch tokens *inside* itself: blocks 0..L-1 run on all 1 + N tokens, blocks L.. on
1 + n_keep (CLS always kept), so `encode_image` gets cheaper.  Scores come from block L-1, the last
block that saw every token: its CLS attention row (from the block's own `in_proj` weights applied to
its input, summed over heads by the methods), its keys averaged over heads (VisionZip) and its
output, i.e. block L's input (the rows that are kept, merged or pooled).  With `layer` = number of
blocks - 1 this is VisionZip's "layer -2" rule.  HiRED's `first_layer` must lie before `layer`.

Token order after the drop: CLS, the kept patches in ascending raster order, then new rows
(VisionZip's contextual tokens / pooled cells).  `handle.stats.images[b]` describes image b:
`kept_indices` are raster patch indices (0..N-1).  A budget that keeps every patch leaves the tower
untouched (bit-identical).  Custom pipelines that feed patch tokens to their own LLM use
`kept_tokens(model, images)`: the tower's token outputs together with their patch indices.

Mechanism: forward pre-hooks on the scored blocks' attention modules (CLS row, keys) and one on
block L (selection), all removed by `remove()`; nothing else is changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlmdrop.interface import ImageTokens, LLMMethod, VisionMethod
from vlmdrop.methods.select import select_images
from vlmdrop.ops.attention import resolve_score
from vlmdrop.stats import DropStats

from .base import Adapter, Installation, register_adapter
from .vision_capture import saliency_from_projections

_TOWER_ATTR = "_vlmdrop_tower_handle"  # on the tower instance while a method is applied (for kept_tokens)


def _tower(model: nn.Module) -> nn.Module:
    """The open_clip VisionTransformer of `model` (the model itself or its `.visual`)."""
    from open_clip.transformer import VisionTransformer

    visual = model if isinstance(model, VisionTransformer) else getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"{type(model).__name__}: vlmdrop supports open_clip towers of type VisionTransformer; "
                         f"this one is {type(visual).__name__}")
    return visual


class _BlockCapture:
    """CLS attention row and head-averaged keys of one block, from its attention module's input."""

    def __init__(self, attn: nn.Module, *, batch_first: bool, score: str = "cls") -> None:
        if getattr(attn, "in_proj_weight", None) is None:
            raise ValueError(f"{type(attn).__name__} has no packed in_proj_weight; cannot score with it")
        if getattr(attn, "logit_scale", None) is not None:
            raise ValueError("open_clip towers with scaled cosine attention are not supported")
        self.attn, self.batch_first, self.score = attn, batch_first, score
        self.num_heads = int(attn.num_heads)
        self.head_dim = attn.in_proj_weight.shape[1] // self.num_heads
        self.cls_row: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.handle: RemovableHandle = attn.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if not args:
            return
        x = args[0] if self.batch_first else args[0].transpose(0, 1)  # (B, T, C)
        b, t, c = x.shape
        w, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        wq, wk = w[:c], w[c:2 * c]
        bq, bk = (None, None) if bias is None else (bias[:c], bias[c:2 * c])
        with torch.no_grad():
            q = nn.functional.linear(x if self.score == "received" else x[:, :1], wq, bq)  # (B, 1 or T, C)
            k = nn.functional.linear(x, wk, bk)  # (B, T, C)
            ln_q, ln_k = getattr(self.attn, "ln_q", None), getattr(self.attn, "ln_k", None)
            if isinstance(ln_q, nn.Module) and not isinstance(ln_q, nn.Identity):  # qk-norm, per head
                q = ln_q(q.view(b, q.shape[1], self.num_heads, -1)).flatten(2)
                k = ln_k(k.view(b, t, self.num_heads, -1)).flatten(2)
            self.cls_row = saliency_from_projections(q, k, score=self.score, num_heads=self.num_heads,
                                                     scale=self.head_dim ** -0.5)  # (B, H, T)
            self.keys = k.view(b, t, self.num_heads, -1).mean(dim=2)  # (B, T, Dh)

    def remove(self) -> None:
        self.handle.remove()
        self.cls_row = self.keys = None


class _TowerDrop:
    """The pre-hook on block `layer` that selects each image's tokens."""

    def __init__(self, adapter: OpenClipAdapter, method: VisionMethod, handle: Any, layer: int,
                 roles: dict[str, int], captures: dict[int, _BlockCapture]) -> None:
        self.adapter, self.method, self.handle = adapter, method, handle
        self.roles, self.captures = roles, captures
        block = adapter.blocks[layer]
        self.hook = block.register_forward_pre_hook(self._hook, with_kwargs=True)
        self.parts: list[Any] = list(captures.values())
        self.visual = adapter.visual
        self.visual.__dict__[_TOWER_ATTR] = handle

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        a = self.adapter
        if args:
            x, rest, key = args[0], args[1:], None
        else:
            key = "q_x" if "q_x" in kwargs else "x"
            x, rest = kwargs[key], ()
        x = x if a.batch_first else x.transpose(0, 1)  # (B, 1+N, C)
        bsz, t, _ = x.shape
        n = a.n_patches
        if t != 1 + n:
            raise ValueError(f"block input has {t} tokens, expected 1 + {n} (patch dropout active? "
                             "vlmdrop needs the tower in eval mode)")
        feat_cap = self.captures[self.roles["feature"]] if "feature" in self.roles else None
        h, w = a.grid
        images = []
        for i in range(bsz):
            # (1, H, N) per role
            cls_attn = {role: self.captures[idx].cls_row[i:i + 1, :, 1:] for role, idx in self.roles.items()}
            keys = feat_cap.keys[i:i + 1, 1:] if feat_cap is not None else None  # (1, N, Dh)
            images.append(ImageTokens(n_before=n, crop_of=torch.zeros(n, dtype=torch.long), local_index=torch.arange(n),
                                      crop_hw=(h, w), n_crops=1, cls_attn=cls_attn, sample=i,
                                      vit_hidden=x[i:i + 1, 1:], vit_keys=keys))
        chosen = select_images(self.method, images)
        self.handle.stats = DropStats(images=[ch.stats for ch in chosen])
        n_keep = {ch.stats.n_kept for ch in chosen}
        if n_keep == {n}:
            return None  # every patch kept: the tower runs untouched
        if len(n_keep) != 1:
            raise AssertionError(f"images of one batch got different token counts {sorted(n_keep)}")
        rows = []
        for i, ch in enumerate(chosen):
            sel = ch.selection
            parts = [x[i, :1], x[i, 1 + sel.kept_indices.to(x.device)]]  # CLS, kept patches
            if sel.n_new:
                parts.append(sel.new_rows.to(x.dtype))
            rows.append(torch.cat(parts))  # (1 + n_keep, C)
        out = torch.stack(rows)  # (B, 1 + n_keep, C)
        out = out if a.batch_first else out.transpose(0, 1)
        if key is None:
            return (out, *rest), kwargs
        return args, {**kwargs, key: out}

    def remove(self) -> None:
        self.hook.remove()
        if self.visual.__dict__.get(_TOWER_ATTR) is self.handle:
            del self.visual.__dict__[_TOWER_ATTR]
        while self.parts:
            self.parts.pop().remove()


@register_adapter
class OpenClipAdapter(Adapter):
    """open_clip CLIP / CustomTextCLIP / CoCa models (or their `.visual`) with a VisionTransformer tower."""

    supported = ("open_clip.CLIP", "open_clip.CustomTextCLIP", "open_clip.CoCa",
                 "open_clip.transformer.VisionTransformer")
    options = ("layer",)

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return type(model).__module__.split(".")[0] == "open_clip"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = _tower(model)
        self.blocks = list(self.visual.transformer.resblocks)
        self.batch_first = bool(getattr(self.visual.transformer, "batch_first", True))
        gh, gw = (int(v) for v in self.visual.grid_size)
        self.grid = (gh, gw)
        self.n_patches = gh * gw

    def install(self, vision: VisionMethod | None, llm: LLMMethod | None, handle: Any, *,
                layer: int | None = None) -> Installation:
        if vision is None or llm is not None:
            raise ValueError("open_clip towers take one vision-stage method (no LLM-stage method)")
        method = vision
        n_layers = len(self.blocks)
        other = self.visual.__dict__.get(_TOWER_ATTR)
        if other is not None and other.active:
            raise ValueError(f"this open_clip tower already has vlmdrop method {other.method!r} applied "
                             "(through the model or its .visual); call handle.remove() first")
        if layer is None:
            layer = n_layers // 2
        if (isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers < layer < n_layers
                or layer % n_layers == 0):
            raise ValueError(f"layer={layer!r} is not valid for a tower with {n_layers} blocks: use an int in "
                             f"1..{n_layers - 1} (or -{n_layers - 1}..-1); blocks layer.. run on the kept tokens "
                             "and block layer-1 scores them")
        layer %= n_layers
        roles = method.vit_layers(n_layers, layer - 1)
        score = resolve_score(method.score, has_cls=True, tower="open_clip tower")
        late = {r: i for r, i in roles.items() if i >= layer}
        if late:
            raise ValueError(f"scoring layers {late} must come before layer={layer}, where tokens are dropped")
        attn_of = {i: self.blocks[i].attn for i in set(roles.values())}
        captures: dict[int, _BlockCapture] = {}
        try:
            for i, attn in attn_of.items():
                captures[i] = _BlockCapture(attn, batch_first=self.batch_first, score=score)
            if "vit_keys" in method.config.needs and "feature" not in roles:
                raise ValueError(f"method {method.config.name!r} needs keys but scores no feature layer")
            inst = Installation(self)
            inst.parts.append(_TowerDrop(self, method, handle, layer, roles, captures))
            return inst
        except BaseException:
            for c in captures.values():
                c.remove()
            raise


@dataclass
class TowerTokens:
    """What an open_clip tower hands a custom pipeline.

    Attributes:
        pooled: (B, D) the tower's pooled embedding (`encode_image` before normalisation).
        tokens: (B, n_kept, C) patch-token outputs (after `ln_post`, before `proj`, as open_clip's
            `output_tokens=True` gives them): kept patches in ascending raster order, then new rows.
        kept_indices: (B, n_kept - n_new) raster patch indices of `tokens[:, :n_kept - n_new]`.
        n_new: merged / pooled rows at the end of `tokens` (VisionZip's contextual tokens).
        stats: the drop statistics of this call (None when no method is applied).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    kept_indices: torch.Tensor
    n_new: int
    stats: DropStats | None


def kept_tokens(model: nn.Module, images: torch.Tensor) -> TowerTokens:
    """Run `model`'s open_clip tower on `images` (B, 3, H, W) and return its patch tokens with their indices.

    `model` is the open_clip model or its `.visual`, whichever the method was applied to.  Works with
    or without a method applied (without one every patch is returned, indices 0..N-1).
    Towers with an attentional pooler (CoCa) return the pooler's queries, not patch tokens: ValueError.
    """
    visual = _tower(model)
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("this tower has an attentional pooler: its tokens are pooler queries, not patch tokens")
    handle = visual.__dict__.get(_TOWER_ATTR)
    active = handle is not None and handle.active
    saved = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = saved
    if getattr(visual, "pool_type", "tok") == "none":
        tokens = tokens[:, 1:]  # (B, n_kept, C) CLS removed
    n = tokens.shape[1]
    if not active:
        idx = torch.arange(n).expand(tokens.shape[0], n)
        return TowerTokens(pooled, tokens, idx, 0, None)
    stats = handle.stats
    if [s.n_kept for s in stats.images] != [n] * tokens.shape[0]:
        raise AssertionError(f"tower returned {n} tokens per image, stats say {[s.n_kept for s in stats.images]}")
    n_new = {s.n_new for s in stats.images}
    if len(n_new) != 1:
        raise AssertionError(f"images of one batch got different numbers of new rows: {sorted(n_new)}")
    idx = torch.stack([s.kept_indices for s in stats.images])  # (B, n_kept - n_new)
    return TowerTokens(pooled, tokens, idx, n_new.pop(), stats)

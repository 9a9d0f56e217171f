"""Capture ViT CLS-attention rows from a layer's own q/k projections with forward hooks.

No `output_attentions`, no eager fallback, no N×N matrix: the q_proj hook keeps the CLS query
(position 0); the k_proj hook, which runs right after it, forms the (crops, H, N) CLS row and drops
the keys.  Works the same under eager, sdpa and flash attention, because the projections are the
layer's own.

Additive options: `q_name`/`k_name` hook other submodules (InternVL's `q_norm`/`k_norm`, which follow
the projections and are `nn.Identity` without qk-norm); roles in `logit_roles` keep the pre-softmax
scaled dot products q·k·scale (GlobalCom2's score) instead of the softmax row.

State: the hooks record only between `begin(record)` and `end()` (the adapter brackets each
`get_image_features` call with them), into that call's `EncodeRecord` (`adapters/state.py`), found
through a thread-local; so a vision forward that failed leaves nothing for the next one, two threads'
encodes never mix, and a projector or tower run outside an encode (e.g. `project`) records nothing.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlmdrop.ops.attention import cls_attention_from_projections, cls_logits_from_projections

from .state import EncodeRecord


class _Recorder:
    """Hooks that record into the calling thread's open `EncodeRecord`, if any."""

    def __init__(self) -> None:
        self._local = threading.local()  # .record: the EncodeRecord of this thread's open encode
        self.handles: list[RemovableHandle] = []

    def begin(self, record: EncodeRecord) -> None:
        """Start recording, in the calling thread, into `record`."""
        self._local.record = record

    def end(self) -> None:
        """Stop recording in the calling thread."""
        self._local.record = None

    def record(self) -> EncodeRecord | None:
        return getattr(self._local, "record", None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._local = threading.local()


class ClsRowCapture(_Recorder):
    """Records, per role, the CLS attention row of one ViT attention module into `EncodeRecord.cls_rows`.

    Args:
        modules: role -> attention module with `q_proj` and `k_proj` linear layers.
        num_heads: heads of those modules.
        scale: their softmax scaling.
        q_name, k_name: the submodules whose outputs are the queries and keys (q runs before k).
        logit_roles: roles whose row is the pre-softmax logits q·k·scale, (crops, H, N), not the softmax.
    """

    def __init__(self, modules: dict[str, nn.Module], *, num_heads: int, scale: float, q_name: str = "q_proj",
                 k_name: str = "k_proj", logit_roles: tuple[str, ...] | frozenset[str] = ()) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale
        self.logit_roles = frozenset(logit_roles)
        for role, mod in modules.items():
            for proj in (q_name, k_name):
                if not isinstance(getattr(mod, proj, None), nn.Module):
                    raise TypeError(f"{type(mod).__name__} has no {proj} module; cannot capture CLS attention")
            self.handles.append(getattr(mod, q_name).register_forward_hook(self._on_q(role)))
            self.handles.append(getattr(mod, k_name).register_forward_hook(self._on_k(role)))

    def _on_q(self, role: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            rec = self.record()
            if rec is not None:
                rec.queries[role] = out[:, 0].detach()  # (C, D) CLS query of every crop

        return hook

    def _on_k(self, role: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            rec = self.record()
            q = rec.queries.pop(role, None) if rec is not None else None
            if q is None:
                return  # not recording, or k computed without a preceding q: not an attention forward we understand
            row_of = cls_logits_from_projections if role in self.logit_roles else cls_attention_from_projections
            rec.cls_rows[role] = row_of(q, out.detach(), num_heads=self.num_heads, scale=self.scale)  # (C, H, N)

        return hook


class FeatureCapture(_Recorder):
    """Records a feature layer's keys (averaged over heads, `EncodeRecord.keys`) and the features a
    projector receives (`EncodeRecord.hidden`).

    Args:
        k_proj: the feature layer's key projection (output (C, N, H*Dh)); None = no keys.
        projector: a module whose first positional input is the (C, N', D) features to capture; None = none.
        num_heads: H.
    """

    def __init__(self, *, k_proj: nn.Module | None, projector: nn.Module | None, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        if k_proj is not None:
            self.handles.append(k_proj.register_forward_hook(self._on_k))
        if projector is not None:
            self.handles.append(projector.register_forward_pre_hook(self._on_projector))

    def _on_k(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        rec = self.record()
        if rec is None:
            return
        c, n, d = out.shape
        if d % self.num_heads:
            raise ValueError(f"key size {d} is not divisible by num_heads={self.num_heads}")
        rec.keys = out.detach().reshape(c, n, self.num_heads, d // self.num_heads).mean(dim=2)  # (C, N, Dh)

    def _on_projector(self, module: nn.Module, args: tuple) -> None:
        rec = self.record()
        if rec is not None and args:
            rec.hidden = args[0].detach()  # (C, N', D)

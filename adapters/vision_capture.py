"""Capture ViT CLS-attention rows from a layer's own q/k projections with forward hooks.

No `output_attentions`, no eager fallback, no N×N matrix: the q_proj hook keeps the CLS query
(position 0); the k_proj hook, which runs right after it, forms the (crops, H, N) CLS row and drops
the keys.  Works the same under eager, sdpa and flash attention, because the projections are the
layer's own.

Additive options: `q_name`/`k_name` hook other submodules (InternVL's `q_norm`/`k_norm`, which follow
the projections and are `nn.Identity` without qk-norm); roles in `logit_roles` keep the pre-softmax
scaled dot products q·k·scale (GlobalCom2's score) instead of the softmax row.

State: the hooks record only between `begin()` and `end()` (the adapter brackets each
`get_image_features` call with them), into buffers of the calling thread; so a vision forward that
failed leaves nothing for the next one, two threads' encodes never mix, and a projector or tower run
outside an encode (e.g. `project`) records nothing.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlmdrop.ops.attention import cls_attention_from_projections


class ClsRowCapture:
    """Collects, per role, the CLS attention row of one ViT attention module per forward.

    Args:
        modules: role -> attention module with `q_proj` and `k_proj` linear layers.
        num_heads: heads of those modules.
        scale: their softmax scaling.
        q_name, k_name: the submodules whose outputs are the queries and keys (q runs before k).
        logit_roles: roles whose row is the pre-softmax logits q·k·scale, (crops, H, N), not the softmax.
    """

    def __init__(self, modules: dict[str, nn.Module], *, num_heads: int, scale: float, q_name: str = "q_proj",
                 k_name: str = "k_proj", logit_roles: tuple[str, ...] | frozenset[str] = ()) -> None:
        self.num_heads = num_heads
        self.scale = scale
        self.logit_roles = frozenset(logit_roles)
        self._local = threading.local()  # .buffers: (rows, pending queries) of this thread's open encode
        self.handles: list[RemovableHandle] = []
        for role, mod in modules.items():
            for proj in (q_name, k_name):
                if not isinstance(getattr(mod, proj, None), nn.Module):
                    raise TypeError(f"{type(mod).__name__} has no {proj} module; cannot capture CLS attention")
            self.handles.append(getattr(mod, q_name).register_forward_hook(self._on_q(role)))
            self.handles.append(getattr(mod, k_name).register_forward_hook(self._on_k(role)))

    def begin(self) -> None:
        """Start recording, in the calling thread, with empty buffers."""
        self._local.buffers = ({}, {})

    def end(self) -> None:
        """Stop recording in the calling thread and drop its buffers."""
        self._local.buffers = None

    def _buffers(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        return getattr(self._local, "buffers", None)

    def _on_q(self, role: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            buf = self._buffers()
            if buf is not None:
                buf[1][role] = out[:, 0].detach()  # (C, D) CLS query of every crop

        return hook

    def _on_k(self, role: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            buf = self._buffers()
            q = buf[1].pop(role, None) if buf is not None else None
            if q is None:
                return  # not recording, or k computed without a preceding q: not an attention forward we understand
            if role in self.logit_roles:
                row = _cls_logits(q, out.detach(), num_heads=self.num_heads, scale=self.scale)
            else:
                row = cls_attention_from_projections(q, out.detach(), num_heads=self.num_heads, scale=self.scale)
            buf[0][role] = row  # (C, H, N)

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The rows recorded since `begin()` in the calling thread, by role (cleared)."""
        buf = self._buffers()
        if buf is None:
            return {}
        rows = dict(buf[0])
        buf[0].clear()
        return rows

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._local = threading.local()


def _cls_logits(q: torch.Tensor, k: torch.Tensor, *, num_heads: int, scale: float) -> torch.Tensor:
    """(C, H, N) pre-softmax CLS logits q_cls·k·scale, float32, from q (C, D) and k (C, N, D)."""
    c, n, d = k.shape
    if d % num_heads:
        raise ValueError(f"hidden size {d} is not divisible by num_heads={num_heads}")
    qh = q.float().reshape(c, num_heads, 1, d // num_heads)  # (C, H, 1, hd)
    kh = k.float().reshape(c, n, num_heads, d // num_heads).transpose(1, 2)  # (C, H, N, hd)
    return (qh @ kh.transpose(-1, -2))[:, :, 0] * scale  # (C, H, N)


class FeatureCapture:
    """Collects a feature layer's keys (averaged over heads) and the features a projector receives.

    Records only between `begin()` and `end()`, per thread, as `ClsRowCapture`.

    Args:
        k_proj: the feature layer's key projection (output (C, N, H*Dh)); None = no keys.
        projector: a module whose first positional input is the (C, N', D) features to capture; None = none.
        num_heads: H.
    """

    def __init__(self, *, k_proj: nn.Module | None, projector: nn.Module | None, num_heads: int) -> None:
        self.num_heads = num_heads
        self._local = threading.local()  # .buffers: {"keys": ..., "hidden": ...} of this thread's open encode
        self.handles: list[RemovableHandle] = []
        if k_proj is not None:
            self.handles.append(k_proj.register_forward_hook(self._on_k))
        if projector is not None:
            self.handles.append(projector.register_forward_pre_hook(self._on_projector))

    def begin(self) -> None:
        """Start recording, in the calling thread, with empty buffers."""
        self._local.buffers = {}

    def end(self) -> None:
        """Stop recording in the calling thread and drop its buffers."""
        self._local.buffers = None

    def _on_k(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        buf = getattr(self._local, "buffers", None)
        if buf is None:
            return
        c, n, d = out.shape
        if d % self.num_heads:
            raise ValueError(f"key size {d} is not divisible by num_heads={self.num_heads}")
        buf["keys"] = out.detach().reshape(c, n, self.num_heads, d // self.num_heads).mean(dim=2)  # (C, N, Dh)

    def _on_projector(self, module: nn.Module, args: tuple) -> None:
        buf = getattr(self._local, "buffers", None)
        if buf is not None and args:
            buf["hidden"] = args[0].detach()  # (C, N', D)

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(keys, hidden) recorded since `begin()` in the calling thread, cleared."""
        buf = getattr(self._local, "buffers", None) or {}
        out = (buf.pop("keys", None), buf.pop("hidden", None))
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._local = threading.local()

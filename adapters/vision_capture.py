"""Capture ViT CLS-attention rows from a layer's own q/k projections with forward hooks.

No `output_attentions`, no eager fallback, no N×N matrix: the q_proj hook keeps the CLS query
(position 0); the k_proj hook, which runs right after it, forms the (crops, H, N) CLS row and drops
the keys.  Works the same under eager, sdpa and flash attention, because the projections are the
layer's own.

Additive options: `q_name`/`k_name` hook other submodules (InternVL's `q_norm`/`k_norm`, which follow
the projections and are `nn.Identity` without qk-norm); roles in `logit_roles` keep the pre-softmax
scaled dot products q·k·scale (GlobalCom2's score) instead of the softmax row.
"""

from __future__ import annotations

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
        self.rows: dict[str, torch.Tensor] = {}
        self._q: dict[str, torch.Tensor] = {}
        self.handles: list[RemovableHandle] = []
        for role, mod in modules.items():
            for proj in (q_name, k_name):
                if not isinstance(getattr(mod, proj, None), nn.Module):
                    raise TypeError(f"{type(mod).__name__} has no {proj} module; cannot capture CLS attention")
            self.handles.append(getattr(mod, q_name).register_forward_hook(self._on_q(role)))
            self.handles.append(getattr(mod, k_name).register_forward_hook(self._on_k(role)))

    def _on_q(self, role: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self._q[role] = out[:, 0].detach()  # (C, D) CLS query of every crop

        return hook

    def _on_k(self, role: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            q = self._q.pop(role, None)
            if q is None:
                return  # k computed without a preceding q: not an attention forward we understand
            if role in self.logit_roles:
                row = _cls_logits(q, out.detach(), num_heads=self.num_heads, scale=self.scale)
            else:
                row = cls_attention_from_projections(q, out.detach(), num_heads=self.num_heads, scale=self.scale)
            self.rows[role] = row  # (C, H, N)

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """Return and clear the rows of the last vision forward."""
        rows, self.rows = self.rows, {}
        self._q.clear()
        return rows

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.rows.clear()
        self._q.clear()


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

    Args:
        k_proj: the feature layer's key projection (output (C, N, H*Dh)); None = no keys.
        projector: a module whose first positional input is the (C, N', D) features to capture; None = none.
        num_heads: H.
    """

    def __init__(self, *, k_proj: nn.Module | None, projector: nn.Module | None, num_heads: int) -> None:
        self.num_heads = num_heads
        self.keys: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.paused = False
        self.handles: list[RemovableHandle] = []
        if k_proj is not None:
            self.handles.append(k_proj.register_forward_hook(self._on_k))
        if projector is not None:
            self.handles.append(projector.register_forward_pre_hook(self._on_projector))

    def _on_k(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        c, n, d = out.shape
        if d % self.num_heads:
            raise ValueError(f"key size {d} is not divisible by num_heads={self.num_heads}")
        self.keys = out.detach().reshape(c, n, self.num_heads, d // self.num_heads).mean(dim=2)  # (C, N, Dh)

    def _on_projector(self, module: nn.Module, args: tuple) -> None:
        if not self.paused and args:
            self.hidden = args[0].detach()  # (C, N', D)

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(keys, hidden) of the last vision forward, cleared."""
        out = (self.keys, self.hidden)
        self.keys = self.hidden = None
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.keys = self.hidden = None

"""Capture ViT saliency rows (the CLS row, or the attention each token receives) from a layer's own q/k
projections with forward hooks.

No `output_attentions`, no eager fallback, no N×N matrix: the q_proj hook keeps the queries (only the
CLS query, position 0, for `score="cls"`); the k_proj hook, which runs right after it, forms the
(crops, H, N) row and drops the keys.  Works the same under eager, sdpa and flash attention, because
the projections are the layer's own.

Scores (`score`, resolved from a method's `score` option by `vlmdrop.ops.attention.resolve_score`):
"cls" = the CLS query's softmax row; "received" = softmax(q kᵀ · scale) averaged over all queries, per
head, streamed by `vlmdrop.kernels.attention_received` (the rule for towers without a CLS token, such
as SigLIP).  `saliency_from_projections` is the one function that turns a layer's q/k into either, for
adapters whose towers need their own hooks (a fused qkv projection).

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

from vlmdrop.kernels import attention_received
from vlmdrop.ops.attention import cls_attention_from_projections, cls_logits_from_projections

from .state import EncodeRecord


def saliency_from_projections(q: torch.Tensor, k: torch.Tensor, *, score: str, num_heads: int, scale: float,
                              logits: bool = False) -> torch.Tensor:
    """One ViT layer's per-token saliency from its own queries and keys, per head.

    Args:
        q: (B, N, D) the layer's queries, or (B, D) the CLS query alone (enough for "cls").
        k: (B, N, D) its keys, D = num_heads * head_dim.
        score: "cls": the CLS query's (position 0) softmax row; "received": the attention each token
            receives, softmax(q kᵀ · scale) averaged over all N queries (streamed: no N×N matrix).
        num_heads, scale: the layer's heads and softmax scaling.
        logits: with "cls", the pre-softmax CLS logits q·k·scale instead of the softmax (GlobalCom2's
            score); "received" has no pre-softmax form and ignores it.

    Returns:
        (B, H, N) float32.
    """
    if score == "cls":
        row_of = cls_logits_from_projections if logits else cls_attention_from_projections
        return row_of(q[:, 0] if q.dim() == 3 else q, k, num_heads=num_heads, scale=scale)
    if score != "received":
        raise ValueError(f"score={score!r}: a capture computes 'cls' or 'received' (resolve 'auto' first)")
    b, n, d = k.shape
    if q.shape != k.shape:
        raise ValueError(f"score='received' needs every query: q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if d % num_heads:
        raise ValueError(f"hidden size {d} is not divisible by num_heads={num_heads}")
    qh = q.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)  # (B, H, N, hd)
    kh = k.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)  # (B, H, N, hd)
    return attention_received(qh, kh, scale=scale)  # (B, H, N)


class Recorder:
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


class ClsRowCapture(Recorder):
    """Records, per role, the saliency row of one ViT attention module into `EncodeRecord.cls_rows`:
    its CLS attention row (`score="cls"`) or the attention each token receives (`score="received"`).

    Args:
        modules: role -> attention module with `q_proj` and `k_proj` linear layers.
        num_heads: heads of those modules.
        scale: their softmax scaling.
        q_name, k_name: the submodules whose outputs are the queries and keys (q runs before k).
        logit_roles: roles whose row is the pre-softmax logits q·k·scale, (crops, H, N), not the softmax
            (with `score="cls"` only).
        score: "cls" or "received" (resolved; see the module docstring).
    """

    def __init__(self, modules: dict[str, nn.Module], *, num_heads: int, scale: float, q_name: str = "q_proj",
                 k_name: str = "k_proj", logit_roles: tuple[str, ...] | frozenset[str] = (),
                 score: str = "cls") -> None:
        super().__init__()
        if score not in ("cls", "received"):
            raise ValueError(f"score={score!r}: ClsRowCapture computes 'cls' or 'received'")
        self.num_heads = num_heads
        self.scale = scale
        self.score = score
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
                # (C, D) the CLS query of every crop, or (C, N, D) every query for "received"
                rec.queries[role] = out[:, 0].detach() if self.score == "cls" else out.detach()

        return hook

    def _on_k(self, role: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            rec = self.record()
            q = rec.queries.pop(role, None) if rec is not None else None
            if q is None:
                return  # not recording, or k computed without a preceding q: not an attention forward we understand
            rec.cls_rows[role] = saliency_from_projections(  # (C, H, N)
                q, out.detach(), score=self.score, num_heads=self.num_heads, scale=self.scale,
                logits=role in self.logit_roles)

        return hook


class FeatureCapture(Recorder):
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

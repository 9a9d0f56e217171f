"""FastV (Chen et al., ECCV 2024): drop image tokens inside the LLM at layer K by layer K−1's attention.

At decoder layer K (default 2) the image tokens are ranked by the attention the last prompt token
pays them in layer K−1, averaged over heads; from layer K on only the top ones remain.  As in the
official code (pkunlp-icler/FastV: `keep_indexs` fed back as `position_ids` in
`src/transformers/src/transformers/models/llama/modeling_llama.py`,
`src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py` (`fastv_forward`) and
`src/FastV/lmms-eval/fastv_kvcache.py`), kept tokens keep their RoPE positions by default
(`positions="original"`).  Counts: `round(keep · n)` here, as `fastv_forward`'s
`round(n · (1 − fastv_r))`; `fastv_kvcache.py` floors (`int(576 · ratio)`), the first file takes an absolute
`fast_v_attention_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..interface import LLMMethod, MethodConfig
from ..ops.budget import resolve_budget, validate_budget
from ..registry import register_method

POSITIONS = ("original", "compact")


def validate_positions(positions: object) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r} is not valid; choose one of: {', '.join(POSITIONS)}")


def validate_layer_count(layers: list[int], num_layers: int, *, what: str) -> None:
    """Every drop layer K needs a layer K−1 to score from and must leave at least layer K to run."""
    for k in layers:
        if not 1 <= k < num_layers:
            raise ValueError(f"{what}={k} is out of range for a language model with {num_layers} decoder layers "
                             f"(valid: 1..{num_layers - 1}; layer K is scored by layer K-1)")


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    """Parameters of FastV.

    layer: decoder layer K (0-based) from which the dropped image tokens are gone; scored by layer K−1.
    keep: fraction (float in (0, 1]) or count (int >= 1) of each image's tokens kept from layer K on;
        a float keeps `round(keep * n)` of an image's `n` tokens (at least 1).
    positions: "original" (kept tokens keep their RoPE positions, as the official code) or "compact".
    """

    stage: ClassVar[str] = "llm"
    budget_field: ClassVar[str] = "keep"  # a budget is the share (or count) kept from layer K on

    @classmethod
    def depth_defaults(cls, num_layers: int) -> dict[str, Any]:
        """`layer` for an LM of `num_layers` decoder layers where it differs from the default: the paper's
        K=2, but no later than the LM's first third (at least 1): 1 on an LM of fewer than 6 layers."""
        k = min(2, max(1, num_layers // 3))
        return {} if k == cls.layer else {"layer": k}

    @classmethod
    def budget_params(cls, budget: float | int, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"keep": budget}

    layer: int = 2
    keep: float | int = 0.5
    positions: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer={self.layer!r} must be an int >= 1 (layer K is scored by layer K-1)")
        validate_budget(self.keep, name="keep")
        validate_positions(self.positions)


@register_method("fastv", FastVConfig)
class FastV(LLMMethod):
    """FastV: one drop at layer K, ranked by the last prompt token's attention in layer K−1 (mean over heads)."""


    def drop_layers(self, num_layers: int) -> list[int]:
        validate_layer_count([self.config.layer], num_layers, what="layer")
        return [self.config.layer]

    def n_keep(self, stage: int, n_before: int, n_present: int) -> int:
        return resolve_budget(self.config.keep, n_present)

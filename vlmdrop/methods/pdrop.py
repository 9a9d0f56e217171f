"""PyramidDrop (Xing et al., CVPR 2025): image tokens dropped stage by stage inside the LLM.

The decoder is cut into stages at `layers` (default 8, 16, 24); at each boundary K a fraction
`ratio` (default 0.5) of the image tokens still present is kept, ranked by the attention the last
instruction token pays them, averaged over heads.  Stage s therefore keeps
`round(n · r_0 · … · r_s)` of an image's `n` tokens (the official code floors; see README).

Ranking (`score_layer`), against the official code (Cooperx521/PyramidDrop, commit 6444f30,
`llava/model/modeling_llama_pdrop.py`): after decoder layer K−1 has run, `pdrop_forward` (l. 1222,
`rank_layer = layer_idx+1`) calls `pdrop_rank_drop`, which applies layer K's own `input_layernorm`,
`q_proj`, `k_proj` and RoPE to layer K's input (l. 1322-1342), takes the last instruction token's
softmax row, mean over heads (l. 1391-1399), keeps the top tokens (l. 1405) and hands the reduced
sequence to the loop, so layer K itself already runs on it.  `score_layer="current"` (default) does
exactly that (one extra key projection of the sequence and one query row per sample at each
boundary); `score_layer="previous"` ranks with the attention layer K−1 computed (no extra work, the
FastV rule).  The official code renumbers positions contiguously after each drop (l. 1446): use
`positions="compact"` for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..interface import LLMMethod, MethodConfig
from ..registry import register_method
from .fastv import validate_layer_count, validate_positions

SCORE_LAYERS = ("current", "previous")


@dataclass(frozen=True)
class PDropConfig(MethodConfig):
    """Parameters of PyramidDrop.

    layers: stage boundaries, strictly increasing decoder layer indices K >= 1; tokens are dropped at
        the input of each.
    ratio: fraction of the image tokens still present kept at each boundary: one float in (0, 1] for
        every stage, or one per boundary.
    positions: "original" (kept tokens keep their RoPE positions) or "compact" (as the official code).
    score_layer: "current" (the official rule: layer K's own q/k on its input, before the drop) or
        "previous" (layer K−1's attention, as it ran).
    """

    stage: ClassVar[str] = "llm"
    budget_field: ClassVar[str] = "ratio"

    @classmethod
    def depth_defaults(cls, num_layers: int) -> dict[str, Any]:
        """`layers` for an LM of depth L where they differ from the default: the paper's 8/16/24 of 32 scaled,
        round(L/4), round(L/2), round(3L/4) (halves up), kept within 1..L-1, duplicates dropped (3: [1, 2])."""
        if num_layers < 2:
            return {}
        cuts = sorted({min(max(int(i * num_layers / 4 + 0.5), 1), num_layers - 1) for i in (1, 2, 3)})
        return {} if tuple(cuts) == cls.layers else {"layers": cuts}

    @classmethod
    def budget_params(cls, budget: float | int, params: Mapping[str, Any]) -> dict[str, Any]:
        """A budget is the share of an image's tokens left after the last boundary: each of the n boundaries
        keeps `budget ** (1 / n)` (boundaries 1, 2 and budget 0.1: 0.316 at each)."""
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget={budget!r}: PyramidDrop takes a fraction in (0, 1], the share of the image "
                             "tokens left after its last stage (a token count has no per-stage ratio)")
        layers = params.get("layers", cls.layers)
        n = len(layers) if isinstance(layers, (list, tuple)) and layers else len(cls.layers)
        return {"ratio": budget ** (1.0 / n)}

    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float | tuple[float, ...] = 0.5
    positions: str = "original"
    score_layer: str = "current"

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = self.layers
        if isinstance(layers, list):
            object.__setattr__(self, "layers", tuple(layers))
            layers = self.layers
        if (not isinstance(layers, tuple) or not layers
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in layers)
                or any(b <= a for a, b in zip(layers, layers[1:]))):
            raise ValueError(f"layers={self.layers!r} must be a non-empty, strictly increasing sequence of ints >= 1")
        ratio = self.ratio
        if isinstance(ratio, list):
            object.__setattr__(self, "ratio", tuple(ratio))
            ratio = self.ratio
        ratios = ratio if isinstance(ratio, tuple) else (ratio,) * len(layers)
        if len(ratios) != len(layers):
            raise ValueError(f"ratio={self.ratio!r} has {len(ratios)} values but layers={self.layers!r} "
                             f"has {len(layers)}")
        for r in ratios:  # compared as they are: float() of a huge int would overflow
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ValueError(f"ratio={self.ratio!r}: every ratio must be a number in (0, 1], got {r!r}")
        validate_positions(self.positions)
        if self.score_layer not in SCORE_LAYERS:
            raise ValueError(f"score_layer={self.score_layer!r} is not valid; choose one of: {', '.join(SCORE_LAYERS)}")

    def ratios(self) -> tuple[float, ...]:
        r = self.ratio
        return tuple(float(x) for x in r) if isinstance(r, tuple) else (float(r),) * len(self.layers)


@register_method("pdrop", PDropConfig)
class PDrop(LLMMethod):
    """PyramidDrop: at each stage boundary K keep `ratio` of the image tokens still present, ranked by
    layer K's own attention on its input (official) or layer K−1's."""


    def drop_layers(self, num_layers: int) -> list[int]:
        layers = list(self.config.layers)
        if self.config.score_layer == "previous":
            validate_layer_count(layers, num_layers, what="layers")
        for k in layers:  # as the official code: a boundary follows a layer and precedes one
            if not 1 <= k < num_layers:
                raise ValueError(f"layers={k} is out of range for a language model with {num_layers} decoder layers "
                                 f"(valid: 1..{num_layers - 1})")
        return layers

    def n_keep(self, stage: int, n_before: int, n_present: int) -> int:
        frac = 1.0
        for r in self.config.ratios()[: stage + 1]:
            frac *= r
        # the product of ratios mapped from a budget carries float error (0.1 ** (1/3) cubed is 0.10000000000000002):
        # rounded to 12 places, a budget of 0.1 keeps round(0.1 * n) after the last stage, as every other method
        frac = round(frac, 12)
        return min(n_present, max(1, round(frac * n_before))) if n_before else 0

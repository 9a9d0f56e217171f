"""PyramidDrop (Xing et al., CVPR 2025): image tokens dropped stage by stage inside the LLM.

The decoder is cut into stages at `layers` (default 8, 16, 24); at each boundary K a fraction
`ratio` (default 0.5) of the image tokens still present is kept, ranked by the attention the last
instruction token pays them, averaged over heads.  Stage s therefore keeps
`round(n · r_0 · … · r_s)` of an image's `n` tokens (the official code floors; see README).

Differences from the official code (Cooperx521/PyramidDrop, `modeling_llama_pdrop.py`), documented
in the README: the official code recomputes the boundary layer K's own q/k projections on its input
(one extra projection of the whole sequence); vlmdrop scores with the attention of layer K−1, the
last layer of the finishing stage, captured from its own projections (no extra work).  The official
code renumbers positions contiguously after each drop: use `positions="compact"` for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..interface import LLMMethod, MethodConfig
from ..registry import register_method
from .fastv import validate_layer_count, validate_positions


@dataclass(frozen=True)
class PDropConfig(MethodConfig):
    """Parameters of PyramidDrop.

    layers: stage boundaries, strictly increasing decoder layer indices K >= 1; tokens are dropped at
        the input of each (scored by layer K−1).
    ratio: fraction of the image tokens still present kept at each boundary: one float in (0, 1] for
        every stage, or one per boundary.
    positions: "original" (kept tokens keep their RoPE positions) or "compact" (as the official code).
    """

    stage: ClassVar[str] = "llm"

    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float | tuple[float, ...] = 0.5
    positions: str = "original"

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
            raise ValueError(f"ratio={self.ratio!r} has {len(ratios)} values but layers={self.layers!r} has {len(layers)}")
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
                raise ValueError(f"ratio={self.ratio!r}: every ratio must be a number in (0, 1], got {r!r}")
        validate_positions(self.positions)

    def ratios(self) -> tuple[float, ...]:
        r = self.ratio
        return tuple(float(x) for x in r) if isinstance(r, tuple) else (float(r),) * len(self.layers)


@register_method("pdrop", PDropConfig)
class PDrop(LLMMethod):
    """PyramidDrop: at each stage boundary keep `ratio` of the image tokens still present."""


    def drop_layers(self, num_layers: int) -> list[int]:
        layers = list(self.config.layers)
        validate_layer_count(layers, num_layers, what="layers")
        return layers

    def n_keep(self, stage: int, n_before: int, n_present: int) -> int:
        frac = 1.0
        for r in self.config.ratios()[: stage + 1]:
            frac *= r
        return min(n_present, max(1, round(frac * n_before))) if n_before else 0

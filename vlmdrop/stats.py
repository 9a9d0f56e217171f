"""What the last prefill forward did, per image, in batch order."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageStats:
    """One image of the last prefill.

    Attributes:
        sample: batch row the image belongs to.
        n_before: visual positions the unmodified model feeds the LLM for this image (newlines included).
        n_kept: rows handed to the LLM for this image (original positions kept + new rows); the budget.
            With an LLM-stage method: the image tokens that survive its last drop.
        kept_indices: (n_kept - n_new,) ascending indices into the `n_before` positions kept as they are.
        crop_budgets: tokens allotted per crop, in the order the model receives the crops (LLaVA-NeXT: base
            image first; InternVL: tiles, thumbnail last).
        crop_kept: tokens kept per crop, same order.
        method: the method that made the selection ("hired+fastv" when a vision and an LLM stage are stacked).
        layer_tokens: LLM-stage methods only: the image's tokens present in each decoder layer (one int per
            layer); empty for vision-stage methods.
        n_new: rows made by merging or pooling (VisionZip's contextual tokens, `pool`'s cells); they
            follow the kept positions in the sequence.
        new_groups: n_new LongTensors: the positions each new row summarises (None without new rows).
    """

    sample: int
    n_before: int
    n_kept: int
    kept_indices: torch.Tensor
    crop_budgets: list[int]
    crop_kept: list[int]
    method: str = ""
    layer_tokens: list[int] = field(default_factory=list)
    n_new: int = 0
    new_groups: list[torch.Tensor] | None = None


@dataclass
class DropStats:
    """Statistics of the last prefill forward (decode steps never overwrite them)."""

    images: list[ImageStats] = field(default_factory=list)

    @property
    def n_before(self) -> int:
        return sum(i.n_before for i in self.images)

    @property
    def n_kept(self) -> int:
        return sum(i.n_kept for i in self.images)

    def __repr__(self) -> str:
        per = ", ".join(f"{i.n_kept}/{i.n_before}" for i in self.images)
        return f"DropStats(images=[{per}])"

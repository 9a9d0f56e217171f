"""The one vision-stage selection loop, shared by every path (HF VLM prefill, open_clip towers).

Per prefill: one generator from the method (`VisionMethod.generator`, seeded afresh), then per image in
batch order the method's budget (`VisionMethod.n_keep`), its `select`, the exact-budget check (rows =
kept positions + new rows == budget, for every method whose `exact_budget` is true) and the image's
stats record.  Where the rows go is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..interface import ImageTokens, Selection, VisionMethod
from ..stats import ImageStats


@dataclass(frozen=True)
class Selected:
    """One image's outcome: the method's `selection` and the `stats` record (`n_kept` = rows it gets)."""

    image: ImageTokens
    selection: Selection
    stats: ImageStats


def select_images(method: VisionMethod, images: list[ImageTokens]) -> list[Selected]:
    """Run `method` on each image of one prefill, in batch order; AssertionError naming the method when
    an exact-budget method returns a row count other than its budget."""
    generator = method.generator()
    name = method.config.name
    out = []
    for image in images:
        n_keep = method.n_keep(image)
        sel = method.select(image, n_keep, generator=generator)
        n_rows = int(sel.kept_indices.numel()) + sel.n_new  # kept positions + new (merged / pooled) rows
        if not method.exact_budget:
            n_keep = n_rows
        elif n_rows != n_keep:
            raise AssertionError(f"{name} gave {n_rows} rows for image {len(out)} (sample {image.sample}), "
                                 f"budget says {n_keep}")
        groups = None if sel.new_groups is None else [g.cpu() for g in sel.new_groups]
        stats = ImageStats(sample=image.sample, n_before=image.n_before, n_kept=n_keep,
                           kept_indices=sel.kept_indices.cpu(), crop_budgets=list(sel.crop_budgets),
                           crop_kept=list(sel.crop_kept), method=name, n_new=sel.n_new, new_groups=groups)
        out.append(Selected(image=image, selection=sel, stats=stats))
    return out

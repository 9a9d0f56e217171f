"""How the prefill hot path scales: torch operations counted, not timed.

The selection and compaction must not loop in Python over tokens, crops or sequences of the batch:
- HiRED's selection of one image makes the same number of torch operations whatever its crop count (the
  budget split is arithmetic on one host copy of the region scores; every crop's top-k is one `segmented_topk`
  call).  GlobalCom2 selects the same way but still interpolates each sub-image's box of the thumbnail scores
  in a loop over its sub-images (not pinned here);
- the compaction of the prefill (`input_ids`, mask, positions) makes the same number for 1, 2 or 4 sequences
  (one `compact_rows` call), and so does the LLM-stage score (one masked softmax for the whole batch) and the
  LLM-stage selection at a drop layer (one segmented top-k; per image only its bookkeeping, a constant).
The per-image part of the vision stage (the method's `select` runs per image: each image has its own budget)
costs the same number of operations for every image.  Counted with a `TorchDispatchMode` around the functions
of the hot path; every count is exact, so the test is deterministic.
"""

import pytest
import torch
from conftest import PROMPTS, get_model, make_image
from torch.utils._python_dispatch import TorchDispatchMode

import vlmdrop
import vlmdrop.adapters.llm_stage as llm_stage
import vlmdrop.adapters.prefill as prefill


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class _Counted:
    """Counts the torch operations made inside a function (summed over calls), per prefill."""

    def __init__(self, fn):
        self.fn, self.n, self.calls = fn, 0, 0

    def __call__(self, *args, **kwargs):
        counter = _Count()
        with counter:
            out = self.fn(*args, **kwargs)
        self.n += counter.n
        self.calls += 1
        return out


def _count(monkeypatch, method, sizes, *, where, **params):
    """Torch operations inside `where` during one prefill of a batch of images of `sizes` (H, W)."""
    model, proc = get_model("llava_next")
    owner, name = where
    counted = _Counted(getattr(owner, name))

    def wrapper(*args, **kwargs):  # a function, so that it binds as a method where `owner` is a class
        return counted(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    images = [make_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    inputs = proc(images=images, text=[PROMPTS[i % 3] for i in range(len(sizes))], return_tensors="pt",
                  padding=True)
    handle = vlmdrop.apply(model, method, **params)
    try:
        with torch.inference_mode():
            model(**inputs)
        crops = [len(im.crop_budgets) for im in handle.stats.images]
    finally:
        handle.remove()
        monkeypatch.setattr(owner, name, counted.fn)
    assert counted.calls >= 1
    return counted.n, crops


# (H, W) of images whose AnyRes grids give 3, 4 and 5 crops (base + 1x2, 3x1, 2x2 sub-images) on the fixture
GRIDS = {3: (56, 112), 4: (168, 56), 5: (112, 112)}


def test_selection_of_one_image_does_not_grow_with_its_crops(monkeypatch):
    counts = {}
    for n_crops, size in GRIDS.items():
        n, crops = _count(monkeypatch, "hired", [size], where=(prefill, "select_images"), budget=0.3)
        assert crops == [n_crops], (size, crops)
        counts[n_crops] = n
    assert len(set(counts.values())) == 1, counts


def test_selection_costs_the_same_per_image(monkeypatch):
    counts = {b: _count(monkeypatch, "hired", [(112, 112)] * b, where=(prefill, "select_images"), budget=0.3)[0]
              for b in (1, 2, 4)}
    assert counts[4] - counts[2] == 2 * (counts[2] - counts[1]), counts


@pytest.mark.parametrize("method", ["hired", "random"])
def test_compaction_does_not_grow_with_the_batch(monkeypatch, method):
    sizes = [(112, 112), (56, 112), (56, 56), (168, 56)]  # different grids: rows of different lengths
    counts = {b: _count(monkeypatch, method, sizes[:b], where=(prefill.PrefillHook, "_compact"), budget=0.3)[0]
              for b in (1, 2, 4)}
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("where", [(llm_stage, "last_token_attention"), (llm_stage.LLMStageEngine, "_drop")])
def test_llm_stage_score_and_drop_do_not_grow_with_the_batch(monkeypatch, where):
    counts = {b: _count(monkeypatch, "fastv", [(112, 112), (56, 112), (56, 56)][:b], where=where, keep=0.3)[0]
              for b in (1, 2, 3)}
    if where[1] == "last_token_attention":
        assert len(set(counts.values())) == 1, counts
    else:  # one segmented top-k for the batch; per image a constant bookkeeping (its surviving positions)
        assert counts[3] - counts[2] == counts[2] - counts[1], counts


def test_one_topk_launch_per_drop_for_the_whole_batch(monkeypatch):
    import vlmdrop.kernels as kernels

    for b in (1, 3):
        counted = _Counted(kernels.segmented_topk)
        monkeypatch.setattr(kernels, "segmented_topk", counted)
        _count(monkeypatch, "pdrop", [(112, 112), (56, 112), (56, 56)][:b], where=(llm_stage.LLMStageEngine, "_drop"),
               layers=[1, 2, 3], ratio=0.5)
        assert counted.calls == 3, (b, counted.calls)  # one per drop layer, whatever the batch
        monkeypatch.setattr(kernels, "segmented_topk", counted.fn)

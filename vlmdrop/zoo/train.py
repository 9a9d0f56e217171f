"""Train the miniature LLaVA-NeXT of `vlmdrop.zoo.mini` on task "easyvqa-hr".

Usage::

    python -m vlmdrop.zoo.train --out DIR --minutes 35 --seed 0 [--steps-a N --steps-b N --batch B]

Two stages, both defined in steps (so a run is deterministic whatever the machine speed):

* **A — tower pre-training.**  The CLIP tower classifies shape (3) and colour (8) from its CLS
  token (``pooler_output``) and, per patch, background / shape and background / colour from the
  features the LLM receives (``vision_feature_layer``); the heads are not part of the saved model.
  Views per canvas (rendering dominates the cost, so each canvas serves several): the 112 px base
  image (colour only — the shape is too small there to name), the AnyRes tile holding the shape,
  ``--tile-views`` crops at the AnyRes scale with the shape anywhere, ``--zoom-views`` zoomed crops.
  To answer, the CLS token must attend to the shape, which is the saliency HiRED reads; the
  per-patch loss makes the shape's own tokens carry its shape and colour.
* **B — VLM training.**  The whole model, the tower at ``--tower-lr-scale`` x the LR.  Loss on the
  answer token and ``</s>`` only; the generator balances question types and answers.  A
  curriculum first feeds zoomed 112 px views only (one AnyRes tile: the shape is large, the
  sequence short), then full canvases with a share ``--zoom-mix`` of zoomed views.
  ``--yes-no-share`` sets the share of yes/no questions (default: the stream's own third; the
  questions are still taken in stream order, so no question repeats before the stream wraps),
  ``--yes-no-plain-first`` the fraction of stage B whose yes/no questions are plain (no "not"/"no"), and
  ``--init-from DIR`` starts a fresh run from the weights of a saved model (e.g. the shipped one,
  with ``--steps-a 0``: stage B only).  ``--drop-visual P`` hides each visual token from the LM (attention
  mask) with a per-sample probability drawn from U(0, P): visual-token dropout.  ``--answer-probes W`` adds
  linear probes (not saved) on the LM's hidden state at the answer position: the canvas's shape and colour for
  every question and, for yes/no questions, the asked word, the negation and whether they match (weight W).
* **C — saliency** (``--steps-c N``, after stage B; 0 by default).  Only the class embedding and the query / key
  projections of ViT layer 0 and of the feature layer train: the CLS row's patch attention onto the patches holding
  the shape (layer 0 on the base image: HiRED's budget split; the feature layer on the base image and the shape's
  AnyRes tile: the tokens picked inside a crop), while the LLM's patch features are held to what stage B left
  (``--saliency-keep``).  ``--drop-positions compact`` (stage B) renumbers the tokens ``--drop-visual`` keeps, as a
  vision-stage method's compaction does.
* **Patch locality** (``--local-patches W``, both stages).  In every ViT layer up to the one whose output the
  LLM receives, each patch query's attention row is pulled onto the patch itself (cross-entropy, weight W);
  the CLS query stays free.  Then the LLM's feature at a patch depends on that patch's pixels only, so tokens
  away from the shape carry nothing of it and dropping them cannot be compensated by the rest (without it
  the tower spreads the shape over its whole tile: ``TRAINING.md``, runs 5-10).

Sample ``j`` of step ``t`` is easyvqa-hr train sample ``(t * batch + j) mod N`` of the stage's
stream (seeded), and every random choice is keyed on ``(seed, stage, t, j)``: resuming from the
state saved in ``DIR/train_state.pt`` (every ``--save-every`` steps and at the ``--minutes`` cap)
gives the same run.  The state holds only tensors, numbers and strings, and is read with
``torch.load(weights_only=True)``: nothing in it is unpickled as code.  Early checks abort when
shape or colour accuracy on held-out samples is still near chance: at the end of stage A (the
tower's CLS heads on zoomed views) and at ``--check-at`` (fraction of stage B, the VLM's answers);
``--check-at 0`` disables both.  At the end ``DIR`` holds the model (``save_pretrained``,
safetensors) and the processor, loadable with ``from_pretrained`` / ``AutoProcessor``, plus
``train_log.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import pickle
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..ops.attention import cls_attention_from_projections
from .easyvqa_hr import (
    ANSWER_COLORS,
    QTYPES,
    SHAPES,
    _is_negated,
    _words,
    easyvqa_hr_max_n,
    easyvqa_hr_qtype_index,
    easyvqa_hr_records,
)
from .mini import MiniConfig, build_mini, prompt
from .token_boxes import anyres_layout

log = logging.getLogger(__name__)

__all__ = ["TrainArgs", "ChanceError", "StateError", "train", "evaluate_answers", "zoom_view", "view_around",
           "patch_labels", "shape_tile_index", "tile_box", "main"]

STATE = "train_state.pt"
#: Layout of ``train_state.pt``: 2 adds ``format``, ``ema`` and the log as JSON text; 1 (no ``format`` key) is read
#: too, as long as ``torch.load(weights_only=True)`` accepts the file.
STATE_FORMAT = 2
_STATE_KEYS = ("model", "heads", "opt_a", "opt_b", "stage", "step")
_STAGE_A, _STAGE_B, _EVAL, _DROP, _PROBES = 1, 2, 3, 4, 5
_STAGE_C_STREAM = 1000  # stage C reads the stage-A stream (seed + 1000), from its start


class ChanceError(RuntimeError):
    """The early check found shape or colour accuracy still near chance."""


class StateError(RuntimeError):
    """``train_state.pt`` cannot be resumed from (refused by ``torch.load(weights_only=True)``, or not a state)."""


@dataclass(frozen=True)
class TrainArgs:
    out: str
    seed: int = 0
    minutes: float = 35.0
    steps_a: int = 1500
    steps_b: int = 6000
    batch: int = 8
    lr_a: float = 1e-3
    lr_b: float = 5e-4
    tower_lr_scale: float = 0.1
    zoom_only: float = 0.3  # fraction of stage B fed zoomed views only
    zoom_mix: float = 0.25  # share of zoomed views afterwards
    check_at: float = 0.5  # fraction of stage B at which the chance check runs (<= 0: never)
    check_shape: float = 0.45  # chance 1/3
    check_color: float = 0.25  # chance 1/8
    tile_views: int = 2  # stage A: extra crops per canvas at the AnyRes scale
    zoom_views: int = 2  # stage A: zoomed crops per canvas
    dense_weight: float = 1.0  # stage A: weight of the per-patch loss (0: CLS heads only)
    cls_shape: str = "tiles+zoom"  # stage A: views whose CLS names the shape ("zoom": zoomed crops only)
    yes_no_share: float | None = None  # stage B: share of yes/no questions (None: the stream's own 1/3)
    yes_no_plain_first: float = 0.0  # stage B: fraction in which the yes/no questions are plain (no "not"/"no")
    init_from: str | None = None  # folder of a saved model (save_pretrained) whose weights a fresh run starts from
    local_patches: float = 0.0  # weight of the patch-locality loss (stages A and B; 0: none)
    drop_visual: float = 0.0  # stage B: each visual token is hidden from the LM with probability U(0, drop_visual)
    drop_positions: str = "keep"  # "keep": hidden tokens keep their positions; "compact": renumbered as if removed
    answer_probes: float = 0.0  # stage B: weight of the linear probes on the LM's answer position (0: none)
    steps_c: int = 0  # stage C (saliency): steps after stage B (0: no stage C)
    lr_c: float = 1e-3  # stage C: Adam learning rate (constant)
    saliency_keep: float = 100.0  # stage C: weight of keeping the LLM's patch features as stage B left them
    eval_n: int = 96
    save_every: int = 200
    threads: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    progress: bool = True
    model: MiniConfig = field(default_factory=MiniConfig)

    def __post_init__(self) -> None:
        for name in ("steps_a", "steps_b", "steps_c"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not 0.0 <= self.zoom_only <= 1.0 or not 0.0 <= self.zoom_mix <= 1.0:
            raise ValueError(f"zoom_only={self.zoom_only} and zoom_mix={self.zoom_mix} must lie in [0, 1]")
        if self.cls_shape not in ("tiles+zoom", "zoom"):
            raise ValueError(f"cls_shape must be 'tiles+zoom' or 'zoom', got {self.cls_shape!r}")
        if self.yes_no_share is not None and not 0.0 <= self.yes_no_share <= 1.0:
            raise ValueError(f"yes_no_share must lie in [0, 1] (or be None), got {self.yes_no_share}")
        if not 0.0 <= self.yes_no_plain_first <= 1.0:
            raise ValueError(f"yes_no_plain_first must lie in [0, 1], got {self.yes_no_plain_first}")
        if self.yes_no_plain_first > 0 and self.yes_no_share is None:
            raise ValueError(f"yes_no_plain_first={self.yes_no_plain_first} needs yes_no_share (the yes/no stream)")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise ValueError(f"init_from={self.init_from!r} holds no config.json (a save_pretrained folder is needed)")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.local_patches < 0:
            raise ValueError(f"local_patches must be >= 0, got {self.local_patches}")
        if not 0.0 <= self.drop_visual < 1.0:
            raise ValueError(f"drop_visual must lie in [0, 1), got {self.drop_visual}")
        if self.drop_positions not in ("keep", "compact"):
            raise ValueError(f"drop_positions must be 'keep' or 'compact', got {self.drop_positions!r}")
        if self.answer_probes < 0:
            raise ValueError(f"answer_probes must be >= 0, got {self.answer_probes}")
        if self.lr_c <= 0 or self.saliency_keep < 0:
            raise ValueError(f"lr_c must be > 0 and saliency_keep >= 0, got {self.lr_c} and {self.saliency_keep}")


# --------------------------------------------------------------------------- data


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(keys))))


def view_around(image: Image.Image, bbox: Sequence[int], rng: np.random.Generator, size: int,
                side: float) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """A square crop of about ``side`` canvas px holding ``bbox`` at a random place, resized to ``size`` px.

    Returns the view and ``bbox`` in the view's pixel coordinates.
    """
    w, h = image.size
    x0, y0, x1, y1 = bbox
    side = max(min(int(round(side)), w, h), x1 - x0, y1 - y0)
    cx = int(rng.integers(max(0, x1 - side), min(x0, w - side) + 1))
    cy = int(rng.integers(max(0, y1 - side), min(y0, h - side) + 1))
    s = size / side
    view = image.crop((cx, cy, cx + side, cy + side)).resize((size, size), Image.BICUBIC)
    return view, ((x0 - cx) * s, (y0 - cy) * s, (x1 - cx) * s, (y1 - cy) * s)


def zoom_view(image: Image.Image, bbox: Sequence[int], rng: np.random.Generator, size: int) -> Image.Image:
    """A square crop holding ``bbox`` whose side is 2-4x the box's longer side, resized to ``size`` px."""
    x0, y0, x1, y1 = bbox
    return view_around(image, bbox, rng, size, max(x1 - x0, y1 - y0) * rng.uniform(2.0, 4.0))[0]


def patch_labels(box: Sequence[float], label: int, crop: int, patch: int) -> torch.Tensor:
    """Per-patch targets of a ``crop`` px view: ``label`` where the patch overlaps ``box`` (view px) by at
    least a quarter of the patch or half of the box, else 0 (background); raster order, ``(crop // patch) ** 2``."""
    g = crop // patch
    x0, y0, x1, y1 = box
    lo = torch.arange(g, dtype=torch.float64) * patch
    ox = (torch.minimum(lo + patch, torch.tensor(float(x1))) - torch.maximum(lo, torch.tensor(float(x0)))).clamp(min=0)
    oy = (torch.minimum(lo + patch, torch.tensor(float(y1))) - torch.maximum(lo, torch.tensor(float(y0)))).clamp(min=0)
    overlap = oy[:, None] * ox[None, :]  # (rows, cols)
    area = max((x1 - x0) * (y1 - y0), 1e-6)
    hit = (overlap >= 0.25 * patch * patch) | (overlap >= 0.5 * area)
    return torch.where(hit, label, 0).reshape(-1).long()


def shape_tile_index(image_size: tuple[int, int], bbox: Sequence[int], pinpoints: list[list[int]], crop: int) -> int:
    """Index in the processor's ``pixel_values`` of the AnyRes tile holding the bbox centre (0 is the base image).

    Mirrors ``LlavaNextImageProcessor``: aspect-preserving resize to the best pinpoint, centred
    zero padding, raster order of ``crop`` px tiles after the base image.
    """
    w, h = image_size
    tw, th, nw, nh, px, py = anyres_layout(image_size, pinpoints)
    cx = px + (bbox[0] + bbox[2]) / 2 * nw / w
    cy = py + (bbox[1] + bbox[3]) / 2 * nh / h
    col = min(int(cx // crop), tw // crop - 1)
    row = min(int(cy // crop), th // crop - 1)
    return 1 + row * (tw // crop) + col


def tile_box(image_size: tuple[int, int], bbox: Sequence[int], pinpoints: list[list[int]], crop: int,
             tile: int) -> tuple[float, float, float, float]:
    """``bbox`` (canvas px) in the pixel coordinates of AnyRes tile ``tile`` (1-based, as in ``pixel_values``)."""
    w, h = image_size
    tw, th, nw, nh, px, py = anyres_layout(image_size, pinpoints)
    row, col = divmod(tile - 1, tw // crop)
    return (px + bbox[0] * nw / w - col * crop, py + bbox[1] * nh / h - row * crop,
            px + bbox[2] * nw / w - col * crop, py + bbox[3] * nh / h - row * crop)


def base_box(image_size: tuple[int, int], bbox: Sequence[int], crop: int) -> tuple[float, float, float, float]:
    """``bbox`` (canvas px) in the pixel coordinates of the base image (the canvas resized to ``crop`` x ``crop``)."""
    w, h = image_size
    return (bbox[0] * crop / w, bbox[1] * crop / h, bbox[2] * crop / w, bbox[3] * crop / h)


def _stream(split: str, seed: int, start: int, count: int) -> Iterator[dict[str, Any]]:
    """``count`` records from index ``start`` of the split's stream, wrapping around."""
    total = easyvqa_hr_max_n(split)
    i = start % total
    while count > 0:
        take = min(count, total - i)
        yield from easyvqa_hr_records(split, seed=seed, n=i + take, start=i)
        count -= take
        i = 0


# --------------------------------------------------------------------------- stages


_BASE, _TILE, _ZOOM = 0, 1, 2  # view kinds of stage A


class _Heads(torch.nn.Module):
    """Stage A's heads (not saved with the model): shape / colour from the CLS token (``pooler_output``),
    and per patch (background + shape / background + colour) from the features the LLM receives."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(hidden, len(SHAPES))
        self.color = torch.nn.Linear(hidden, len(ANSWER_COLORS))
        self.dense_norm = torch.nn.LayerNorm(hidden)
        self.dense_shape = torch.nn.Linear(hidden, 1 + len(SHAPES))
        self.dense_color = torch.nn.Linear(hidden, 1 + len(ANSWER_COLORS))


def _dense_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over shape patches plus half of that over background patches."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    pos = target.reshape(-1) > 0
    out = 0.5 * loss[~pos].mean() if bool((~pos).any()) else loss.sum() * 0
    if bool(pos.any()):
        out = out + loss[pos].mean()
    return out


#: What the answer probes read from the LM's answer position (the last prompt token): the shape and colour on the
#: canvas (every question), then for yes/no questions the word asked about, the negation and whether the asked word
#: is what the canvas shows.  Ignored targets are -100.
PROBE_TARGETS: tuple[str, ...] = ("seen_shape", "seen_color", "asked", "negated", "match")
_ASKABLE: tuple[str, ...] = SHAPES + tuple(ANSWER_COLORS)


def probe_targets(record: dict[str, Any]) -> list[int]:
    """The :data:`PROBE_TARGETS` of one easyvqa-hr record (``-100`` where a target does not apply).

    ``asked`` indexes ``SHAPES + ANSWER_COLORS``; ``match`` is 1 when the asked word is the canvas's shape or
    colour, so the yes/no answer is ``match`` XOR ``negated``.  Raises ``ValueError`` for a yes/no question that
    names no shape or colour, or two.
    """
    out = [SHAPES.index(record["shape"]), _ASKABLE.index(record["color"]) - len(SHAPES), -100, -100, -100]
    if record["qtype"] != "yes_no":
        return out
    asked = [w for w in dict.fromkeys(_words(record["question"])) if w in _ASKABLE]
    if len(asked) != 1:
        raise ValueError(f"yes/no question {record['question']!r} names {asked}, not one shape or colour")
    negated = _is_negated(record["question"])
    match = asked[0] in (record["shape"], record["color"])
    if match == negated and record["answer"] != "no" or match != negated and record["answer"] != "yes":
        raise ValueError(f"question {record['question']!r} on a {record['color']} {record['shape']}: "
                         f"answer {record['answer']!r} is not match XOR negation")
    out[2:] = [_ASKABLE.index(asked[0]), int(negated), int(match)]
    return out


class _AnswerProbes(torch.nn.Module):
    """Stage B's answer probes (not saved with the model): linear heads on the LM's hidden state at the answer
    position.  ``seen_shape``, ``seen_color``, ``asked`` and ``negated`` read the output of LM layer
    ``ceil(L / 2)``, ``match`` that of layer ``L - 1`` (``L`` text layers), so the last layer is left the XOR of
    match and negation.  Their cross-entropy gives every question a gradient for gathering the canvas's shape and
    colour at the answer position, and the yes/no questions a gradient for each part of their three-way parity,
    which on its own has none of first or second order (TRAINING.md, run 8)."""

    def __init__(self, hidden: int, text_layers: int) -> None:
        super().__init__()
        self.early = math.ceil(text_layers / 2)
        self.late = max(text_layers - 1, self.early)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(hidden, n) for n in
                                          (len(SHAPES), len(ANSWER_COLORS), len(_ASKABLE), 2, 2)])

    def loss(self, hidden_states: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Mean over the probes of their cross-entropy on the rows where they apply; ``hidden_states`` as the LM
        returns them (embeddings first), ``targets`` ``[batch, 5]``."""
        early, late = hidden_states[self.early][:, -3], hidden_states[self.late][:, -3]  # -3: predicts the answer
        losses = []
        for k, head in enumerate(self.heads):
            keep = targets[:, k] >= 0
            if bool(keep.any()):
                x = late if PROBE_TARGETS[k] == "match" else early
                losses.append(F.cross_entropy(head(x[keep].float()), targets[keep, k]))
        return torch.stack(losses).mean()


def _make_probes(args: TrainArgs) -> _AnswerProbes | None:
    """The probes when ``answer_probes > 0``, initialised from their own seed (the global RNG is left as it is, so
    runs without probes are unchanged)."""
    if args.answer_probes <= 0:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed * 1000 + _PROBES)
        return _AnswerProbes(args.model.text_hidden, args.model.text_layers)


def _vit(tower: Any) -> Any:
    """The module of a CLIP-like tower that holds ``embeddings`` and ``encoder.layers``."""
    return tower.vision_model if hasattr(tower, "vision_model") else tower


def _attn_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The ``hidden_states`` an attention module's forward pre-hook (``with_kwargs=True``) receives."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class _PatchLocality:
    """The patch-locality loss: while active, the ViT layers up to the one whose output the LLM receives record
    their attention input (forward pre-hooks; the tower keeps its own attention kernel), and :meth:`loss` is the
    cross-entropy of every patch query's attention row (over CLS and all patches) with the patch itself as the
    target, averaged over layers, heads, patches and views.  Driven to zero, a patch attends only to itself, so
    the features the LLM receives at a patch are a function of that patch's pixels: tokens away from the shape
    carry nothing of it (the CLS query stays free, which is what HiRED and the other vision methods read).
    """

    def __init__(self, model: Any, weight: float) -> None:
        from vlmdrop.adapters.hf_vlm import feature_layer_index

        layers = _vit(model.model.vision_tower).encoder.layers
        self.attn = [layer.self_attn for layer in layers[: feature_layer_index(model.config.vision_feature_layer,
                                                                              len(layers)) + 1]]
        self.weight = weight
        self.inputs: list[tuple[Any, torch.Tensor]] = []
        self.handles: list[Any] = []
        self.diag = float("nan")  # mean attention of a patch on itself at the last loss (logged)

    def __enter__(self) -> _PatchLocality:
        self.inputs = []
        if self.weight > 0:
            for attn in self.attn:
                self.handles.append(attn.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.inputs.append((module, _attn_input(args, kwargs)))

    def loss(self) -> torch.Tensor:
        """The weighted loss of the recorded forward (a zero tensor when the weight is 0)."""
        if not self.inputs:
            return torch.zeros(())
        terms, diags = [], []
        for attn, h in self.inputs:  # h: (V, 1 + N, D)
            v, t, _ = h.shape
            q = attn.q_proj(h[:, 1:]).view(v, t - 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(v, t, attn.num_heads, attn.head_dim).transpose(1, 2)
            logp = torch.log_softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # (V, H, N, 1 + N)
            own = torch.diagonal(logp[..., 1:], dim1=-2, dim2=-1)  # (V, H, N): log attention on itself
            terms.append(-own.mean())
            diags.append(own.detach().exp().mean())
        self.inputs = []
        self.diag = float(torch.stack(diags).mean())
        return self.weight * torch.stack(terms).mean()

    def logged(self) -> dict[str, float]:
        """``{"self_attention": mean attention of a patch on itself}`` at the last loss; empty when off."""
        return {"self_attention": self.diag} if self.weight > 0 else {}


def _stage_a_batch(args: TrainArgs, processor: Any, step: int) -> dict[str, torch.Tensor]:
    """The views of step ``step`` of stage A and their targets.

    Per canvas (rendering dominates the cost, so each canvas gives several views): the base image
    (colour only: the shape is too small there to name), the AnyRes tile holding the shape,
    ``--tile-views`` crops at the AnyRes scale placing the shape anywhere in the view, and
    ``--zoom-views`` zoomed crops (side 1.5-4x the shape's).
    """
    cfg = args.model
    recs = list(_stream("train", args.seed + 1000, step * args.batch, args.batch))
    ip = processor.image_processor
    pins = ip.image_grid_pinpoints
    views, shapes, colors, kinds, dshape, dcolor = [], [], [], [], [], []
    for j, r in enumerate(recs):
        rng = _rng(args.seed, _STAGE_A, step, j)
        image, bbox, (w, h) = r["image"], r["bbox"], r["image"].size
        pv = ip(images=[image], return_tensors="pt")["pixel_values"][0]  # (P, 3, s, s)
        tile = shape_tile_index((w, h), bbox, pins, cfg.crop)
        v = [pv[0], pv[tile]]
        boxes = [base_box((w, h), bbox, cfg.crop), tile_box((w, h), bbox, pins, cfg.crop, tile)]
        _, _, nw, _, _, _ = anyres_layout((w, h), pins)
        longest = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        sides = ([cfg.crop * w / nw] * args.tile_views
                 + [longest * rng.uniform(1.5, 4.0) for _ in range(args.zoom_views)])
        crops = [view_around(image, bbox, rng, cfg.crop, side) for side in sides]
        if crops:
            # a crop-sized image becomes base + one identical tile (pinpoint crop x crop): take the tile
            v += list(ip(images=[c for c, _ in crops], return_tensors="pt")["pixel_values"][:, 1])
            boxes += [b for _, b in crops]
        si, ci = SHAPES.index(r["shape"]), list(ANSWER_COLORS).index(r["color"])
        views += v
        shapes += [si] * len(v)
        colors += [ci] * len(v)
        kinds += [_BASE, _TILE] + [_TILE] * args.tile_views + [_ZOOM] * args.zoom_views
        dshape += [patch_labels(b, 1 + si, cfg.crop, cfg.patch) for b in boxes]
        dcolor += [patch_labels(b, 1 + ci, cfg.crop, cfg.patch) for b in boxes]
    return {"views": torch.stack(views), "shape": torch.tensor(shapes), "color": torch.tensor(colors),
            "kind": torch.tensor(kinds), "dense_shape": torch.stack(dshape), "dense_color": torch.stack(dcolor)}


def _stage_a_loss(model: Any, heads: _Heads, batch: dict[str, torch.Tensor], args: TrainArgs,
                  locality: _PatchLocality) -> torch.Tensor:
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with locality:
        out = model.model.vision_tower(batch["views"], output_hidden_states=True)
    pooled = out.pooler_output  # (V, D)
    named = batch["kind"] == _ZOOM if args.cls_shape == "zoom" else batch["kind"] != _BASE
    loss = F.cross_entropy(heads.shape(pooled[named]), batch["shape"][named])
    loss = loss + F.cross_entropy(heads.color(pooled), batch["color"])
    if args.dense_weight > 0:
        feats = heads.dense_norm(out.hidden_states[args.model.feature_layer][:, 1:])  # (V, N, D), CLS dropped
        loss = loss + args.dense_weight * (_dense_ce(heads.dense_shape(feats), batch["dense_shape"])
                                           + _dense_ce(heads.dense_color(feats), batch["dense_color"]))
    return loss + locality.loss().to(loss.device)


def _stage_b_records(args: TrainArgs, step: int) -> Iterator[dict[str, Any]]:
    """The train records of step ``step`` of stage B.

    By default sample ``j`` is record ``step * batch + j`` of the stream (a third of each type).  With
    ``yes_no_share = p``, global sample ``g = step * batch + j`` is a yes/no question iff
    ``floor((g + 1) p) > floor(g p)`` (so exactly ``floor(g p)`` of the first ``g`` are): the ``floor(g p)``-th
    yes/no record of the stream, else the ``g - floor(g p)``-th shape-or-colour record.  During the first
    ``yes_no_plain_first`` of stage B the yes/no records are the plain ones (no "not"/"no") only: with the four
    (answer, negation) cells balanced, neither the comparison nor the negation alone predicts the answer (a
    parity of three things), so the comparison is learned first.
    """
    if args.yes_no_share is None:
        yield from _stream("train", args.seed, step * args.batch, args.batch)
        return
    p = args.yes_no_share
    plain = False if step < args.yes_no_plain_first * args.steps_b else None
    for g in range(step * args.batch, (step + 1) * args.batch):
        done = math.floor(g * p)
        if math.floor((g + 1) * p) > done:
            i = easyvqa_hr_qtype_index("train", args.seed, done, qtypes=("yes_no",), negated=plain)
        else:
            i = easyvqa_hr_qtype_index("train", args.seed, g - done, qtypes=("shape", "color"))
        yield next(easyvqa_hr_records("train", seed=args.seed, n=i + 1, start=i))


def _stage_b_batch(args: TrainArgs, processor: Any, step: int) -> dict[str, torch.Tensor]:
    cfg = args.model
    zoom_p = 1.0 if step < args.zoom_only * args.steps_b else args.zoom_mix
    images, texts, targets = [], [], []
    for j, r in enumerate(_stage_b_records(args, step)):
        rng = _rng(args.seed, _STAGE_B, step, j)
        zoomed = rng.uniform() < zoom_p
        images.append(zoom_view(r["image"], r["bbox"], rng, cfg.crop) if zoomed else r["image"])
        texts.append(prompt(processor, r["question"]) + " " + r["answer"] + processor.tokenizer.eos_token)
        targets.append(probe_targets(r))
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]  # left padding: answer word + </s> are the last two
    batch["labels"] = labels
    if args.drop_visual > 0:
        _hide_visual_tokens(batch, processor.image_token_id, args, step)
    out = dict(batch)
    if args.answer_probes > 0:
        out["probe_targets"] = torch.tensor(targets, dtype=torch.long)
    return out


def _hide_visual_tokens(batch: Any, image_token_id: int, args: TrainArgs, step: int) -> None:
    """Visual-token dropout: in row ``j`` every ``<image>`` position is masked out of the LM's attention
    (``attention_mask`` 0; positions and the other tokens unchanged) with probability ``r_j ~ U(0,
    drop_visual)``, keyed on ``(seed, _DROP, step, j)``.  The LM learns to answer from whichever visual
    tokens are left, as every token-dropping method will ask of it.

    With ``drop_positions="compact"`` the batch also gets ``position_ids`` that skip the hidden tokens (each
    position minus the hidden tokens before it), so the LM sees the kept tokens numbered as a vision-stage
    method's compaction numbers them (the rows removed, the rest contiguous); with ``"keep"`` (the default, the
    recipe of runs 13-22) they keep the positions of the full sequence, which no dropping method produces."""
    mask = batch["attention_mask"]
    for j in range(mask.shape[0]):
        rng = _rng(args.seed, _DROP, step, j)
        rate = rng.uniform(0.0, args.drop_visual)
        pos = (batch["input_ids"][j] == image_token_id).nonzero().flatten()
        hide = torch.from_numpy(rng.uniform(size=len(pos)) < rate)
        mask[j, pos[hide]] = 0
    if args.drop_positions == "compact":
        hidden = (batch["input_ids"] == image_token_id) & (mask == 0)  # (B, L): the visual tokens just hidden
        before = torch.cumsum(hidden.long(), dim=1) - hidden.long()  # hidden tokens strictly before each position
        batch["position_ids"] = torch.arange(mask.shape[1]).expand_as(mask) - before  # (B, L)


@torch.no_grad()
def evaluate_answers(model: Any, processor: Any, records: Sequence[dict[str, Any]], batch: int = 8) -> dict[str, float]:
    """Greedy first-token accuracy per question type (and overall) on easyvqa-hr ``records``, in eval mode
    (`vlmdrop.zoo.evaluate.evaluate_dropping` of the unmodified model, accuracy keys only)."""
    from .evaluate import evaluate_dropping

    was_training = model.training
    model.eval()
    try:
        acc = evaluate_dropping(model, processor, records, None, 1.0, batch=batch)
    finally:
        model.train(was_training)
    return {k: v for k, v in acc.items() if k in QTYPES or k == "all"}


@torch.no_grad()
def _evaluate_tower(model: Any, heads: _Heads, processor: Any, records: Sequence[dict[str, Any]], crop: int,
                    seed: int) -> dict[str, float]:
    """CLS-head accuracy for shape and colour on the three kinds of view stage A trains on."""
    was_training = model.training
    model.eval()
    ip = processor.image_processor
    views: dict[str, list[torch.Tensor]] = {"base": [], "tile": [], "zoom": []}
    for j, r in enumerate(records):
        pv = ip(images=[r["image"]], return_tensors="pt")["pixel_values"][0]  # (P, 3, s, s)
        tile = shape_tile_index(r["image"].size, r["bbox"], ip.image_grid_pinpoints, crop)
        zoom = zoom_view(r["image"], r["bbox"], _rng(seed, _EVAL, j), crop)
        views["base"].append(pv[0])
        views["tile"].append(pv[tile])
        views["zoom"].append(ip(images=[zoom], return_tensors="pt")["pixel_values"][0][1])
    shapes = torch.tensor([SHAPES.index(r["shape"]) for r in records], device=model.device)
    colors = torch.tensor([list(ANSWER_COLORS).index(r["color"]) for r in records], device=model.device)
    out = {}
    for kind, v in views.items():
        pooled = model.model.vision_tower(torch.stack(v).to(model.device)).pooler_output  # (N, D)
        out[f"{kind}_shape"] = float((heads.shape(pooled).argmax(-1) == shapes).float().mean())
        out[f"{kind}_color"] = float((heads.color(pooled).argmax(-1) == colors).float().mean())
    model.train(was_training)
    return out


def _check(where: str, shape: float, color: float, args: TrainArgs, n: int, path: Path) -> None:
    failed = [f"{name} accuracy {acc:.3f} (need >= {need}, chance {chance})"
              for name, acc, need, chance in (("shape", shape, args.check_shape, "0.333"),
                                              ("colour", color, args.check_color, "0.125")) if acc < need]
    if failed:
        raise ChanceError(f"early check at {where}: {'; '.join(failed)} on {n} held-out samples. "
                          f"Stopped; state saved in {path} (rerun with --check-at 0 to go on anyway).")


def _optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: Any, ema: float | None, bar: Any) -> float:
    """Backward, clip ``clip``'s gradient norm to 1, step; returns the updated loss EMA (shown on ``bar``)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
    bar.update(1)
    bar.set_postfix(loss=f"{ema:.3f}")
    return ema


def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, min(100, total // 10))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


class _Saliency:
    """Stage C: the tower's CLS attention lands on the shape.

    Trainable: the class embedding and the query / key projections of ViT layer 0 and of the layer whose output
    the LLM receives (the layers HiRED reads: ``first_layer=0`` splits the budget over crops, the feature layer
    picks tokens inside each).  The loss is ``-log`` of the share of the CLS row's patch attention (summed over
    heads, the CLS column left out) that falls on the patches holding the shape: for layer 0 on the base image,
    for the feature layer on the base image and on the AnyRes tile holding the shape; plus ``saliency_keep`` x the
    squared change (relative) of the patch features the LLM receives, against a frozen copy of the tower as stage
    B left it, so the LM's inputs stay what it was trained on.  Without it, layer 0's CLS row puts a third of its
    patch mass on the shape (run 19) and clutter takes part of HiRED's budget (TRAINING.md, run 24).
    """

    def __init__(self, model: Any) -> None:
        from vlmdrop.adapters.hf_vlm import feature_layer_index

        vit = _vit(model.model.vision_tower)
        self.feature = feature_layer_index(model.config.vision_feature_layer, len(vit.encoder.layers))
        self.attn = {0: vit.encoder.layers[0].self_attn, self.feature: vit.encoder.layers[self.feature].self_attn}
        self.params = [vit.embeddings.class_embedding] + [p for a in self.attn.values()
                                                      for p in (*a.q_proj.parameters(), *a.k_proj.parameters())]
        self.inputs: dict[int, torch.Tensor] = {}

    def cls_rows(self, tower: Any, pixels: torch.Tensor, feature_layer: int) -> tuple[dict[int, torch.Tensor],
                                                                                     torch.Tensor]:
        """CLS attention rows ``{layer: (V, H, 1 + N)}`` of layer 0 and the feature layer, and the features the
        LLM receives ``(V, 1 + N, D)`` (``hidden_states[feature_layer]``), from one forward of ``tower``."""
        handles = [a.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, a in self.attn.items()]
        try:
            out = tower(pixels, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        rows = {}
        for i, a in self.attn.items():
            x = self.inputs.pop(i)  # (V, T, D): the layer's normed input
            rows[i] = cls_attention_from_projections(a.q_proj(x[:, 0]), a.k_proj(x), num_heads=a.num_heads,
                                                     scale=a.scale)  # (V, H, T)
        return rows, out.hidden_states[feature_layer]

    def _hook(self, layer: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self.inputs[layer] = _attn_input(args, kwargs)
        return hook


def saliency_share(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of the CLS row's patch attention (summed over heads, CLS column left out) on ``target`` patches.

    Args:
        rows: (V, H, 1 + N) CLS attention rows.
        target: (V, N) bool, the patches holding the shape.

    Returns:
        (V,) shares in [0, 1].
    """
    a = rows[:, :, 1:].sum(dim=1)  # (V, N)
    return (a * target).sum(-1) / a.sum(-1)


def _stage_c_batch(args: TrainArgs, processor: Any, step: int) -> dict[str, torch.Tensor]:
    """Stage C's views of step ``step``: every canvas's base image, then the AnyRes tile holding its shape, with
    the patches on the shape (``patch_labels``) as targets."""
    cfg = args.model
    ip = processor.image_processor
    base, tiles, t_base, t_tile = [], [], [], []
    for r in _stream("train", args.seed + _STAGE_C_STREAM, step * args.batch, args.batch):
        (w, h), bbox = r["image"].size, r["bbox"]
        pv = ip(images=[r["image"]], return_tensors="pt")["pixel_values"][0]  # (P, 3, s, s)
        tile = shape_tile_index((w, h), bbox, ip.image_grid_pinpoints, cfg.crop)
        base.append(pv[0])
        tiles.append(pv[tile])
        t_base.append(patch_labels(base_box((w, h), bbox, cfg.crop), 1, cfg.crop, cfg.patch) > 0)
        t_tile.append(patch_labels(tile_box((w, h), bbox, ip.image_grid_pinpoints, cfg.crop, tile), 1, cfg.crop,
                                   cfg.patch) > 0)
    return {"views": torch.stack(base + tiles), "target": torch.stack(t_base + t_tile)}


def _stage_c_loss(model: Any, ref_tower: Any, saliency: _Saliency, batch: dict[str, torch.Tensor],
                  args: TrainArgs) -> tuple[torch.Tensor, dict[str, float]]:
    views, target = batch["views"].to(model.device), batch["target"].to(model.device)
    n_base = views.shape[0] // 2
    rows, feats = saliency.cls_rows(model.model.vision_tower, views, args.model.feature_layer)
    with torch.no_grad():
        ref = ref_tower(views, output_hidden_states=True).hidden_states[args.model.feature_layer][:, 1:]
    first = saliency_share(rows[0][:n_base], target[:n_base])  # layer 0 on the base images: HiRED's split
    feature = saliency_share(rows[saliency.feature], target)  # the feature layer, base images and shape tiles
    keep = F.mse_loss(feats[:, 1:], ref) / ref.pow(2).mean()
    loss = -torch.log(first + 1e-4).mean() - torch.log(feature + 1e-4).mean() + args.saliency_keep * keep
    return loss, {"first_share": float(first.detach().mean()), "feature_share": float(feature.detach().mean()),
                  "feature_change": float(keep.detach())}


# --------------------------------------------------------------------------- driver


def _optimizers(model: Any, heads: _Heads, args: TrainArgs,
                probes: _AnswerProbes | None = None) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    tower = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    opt_a = torch.optim.AdamW(tower + list(heads.parameters()), lr=args.lr_a, weight_decay=0.01)
    groups = [{"params": tower, "scale": args.tower_lr_scale}, {"params": rest, "scale": 1.0}]
    if probes is not None:
        groups.append({"params": list(probes.parameters()), "scale": 1.0})
    opt_b = torch.optim.AdamW(groups, lr=args.lr_b, weight_decay=0.01)
    return opt_a, opt_b


def _save_state(path: Path, *, model: Any, heads: _Heads, opts: tuple, stage: str, step: int, ema: float | None,
                log_rows: list[dict[str, Any]], probes: _AnswerProbes | None = None,
                extra: dict[str, Any] | None = None) -> None:
    """Write the resumable state atomically: state dicts (tensors, numbers, strings), the stage, the step, the
    loss EMA and the log as JSON text, so that ``torch.load(weights_only=True)`` reads it back.  ``extra``: more
    such entries (stage C: the reference tower ``ref_c`` and its optimizer ``opt_c``)."""
    tmp = path.with_suffix(".tmp")
    st = {"format": STATE_FORMAT, "model": model.state_dict(), "heads": heads.state_dict(),
          "opt_a": opts[0].state_dict(), "opt_b": opts[1].state_dict(), "stage": stage, "step": int(step),
          "ema": None if ema is None else float(ema), "log_json": json.dumps(log_rows)}
    if probes is not None:
        st["probes"] = probes.state_dict()
    st.update(extra or {})
    torch.save(st, tmp)
    tmp.replace(path)


def _load_state(path: Path, device: torch.device) -> dict[str, Any]:
    """Read ``path`` with ``torch.load(weights_only=True)``; returns its keys with ``log`` (list) and ``ema``.

    Raises :class:`StateError` naming the file when torch refuses it (a pickled object that is not a tensor,
    number, string or container: not written by this version's ``_save_state``), when it cannot be read, or when
    it lacks a key or holds another format.
    """
    hint = ("move it away or train into a new --out to start from scratch "
            "(it is never unpickled with weights_only=False)")
    try:
        st = torch.load(path, weights_only=True, map_location=device)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # torch names the first global it refused
        what = f"it pickles {found.group(1)}" if found else str(e).strip().splitlines()[0]
        raise StateError(f"{path} is refused by torch.load(weights_only=True): {what}, not only tensors, numbers "
                         f"and strings as the states of this vlmdrop do (an older or foreign file); {hint}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise StateError(f"{path} cannot be read as a training state ({type(e).__name__}: {e}); {hint}") from e
    if not isinstance(st, dict):
        raise StateError(f"{path} holds a {type(st).__name__}, not a training state dict; {hint}")
    fmt = st.get("format", 1)
    if fmt not in (1, STATE_FORMAT):
        raise StateError(f"{path} has state format {fmt!r}; this vlmdrop reads 1 and {STATE_FORMAT}; {hint}")
    missing = [k for k in _STATE_KEYS + (("log",) if fmt == 1 else ("log_json", "ema")) if k not in st]
    if missing:
        raise StateError(f"{path} lacks {missing} (format {fmt}); {hint}")
    if st["stage"] not in ("A", "B", "C") or not isinstance(st["step"], int) or st["step"] < 0:
        raise StateError(f"{path} holds stage={st['stage']!r} step={st['step']!r}; expected 'A', 'B' or 'C' and a "
                         f"step >= 0")
    if st["stage"] == "C" and "ref_c" not in st:  # opt_c is absent only at step 0 (a fresh optimizer then)
        raise StateError(f"{path} is in stage C but lacks its reference tower (ref_c); {hint}")
    if fmt == 1:  # the previous layout: same contents, plain types, no EMA (only the logged loss restarts)
        log.warning("%s is in the previous state format (1); it loads with weights_only=True, resuming from it", path)
        st["ema"] = None
    else:
        st["log"] = json.loads(st.pop("log_json"))
    return st


def _init_weights(model: Any, folder: Path) -> None:
    """Copy the weights of the model saved in ``folder`` (``save_pretrained``) into ``model`` (same architecture).

    Raises ``ValueError`` naming the folder when a weight is missing, extra or of another shape.
    """
    from transformers import LlavaNextForConditionalGeneration

    src = LlavaNextForConditionalGeneration.from_pretrained(folder).state_dict()
    try:
        model.load_state_dict(src, strict=True)
    except RuntimeError as e:
        raise ValueError(f"init_from={str(folder)!r} does not match the model of --crop/--patch/... "
                         f"({str(e).strip().splitlines()[0]} ...)") from e
    log.info("initialised the model from %s", folder)


def train(args: TrainArgs) -> dict[str, Any]:
    """Run (or resume) training into ``args.out``; returns the final metrics.

    Raises :class:`ChanceError` when the early check fails; returns ``{"finished": False}`` when the
    ``minutes`` cap is reached first (state saved: run again to resume).
    """
    from tqdm.auto import tqdm

    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, processor = build_mini(args.model, seed=args.seed)
    heads = _Heads(args.model.vision_hidden)
    probes = _make_probes(args)
    state_path = out / STATE
    if args.init_from is not None and not state_path.exists():  # a fresh run starts from these weights
        _init_weights(model, Path(args.init_from))
    model.to(device)
    heads.to(device)
    if probes is not None:
        probes.to(device)
    opts = _optimizers(model, heads, args, probes)
    stage, step, log_rows = "A", 0, []
    extra: dict[str, Any] = {}  # stage C's state: the reference tower and the optimizer's state dict
    (out / "train_args.json").write_text(json.dumps(asdict(args), indent=1), encoding="utf-8")
    ema: float | None = None  # loss EMA shown on the progress bar and logged (part of the state, so logs match)
    if state_path.exists():
        st = _load_state(state_path, device)
        model.load_state_dict(st["model"])
        heads.load_state_dict(st["heads"])
        if (probes is None) != ("probes" not in st):
            raise StateError(f"{state_path} was written {'with' if 'probes' in st else 'without'} answer probes, "
                             f"and this run has answer_probes={args.answer_probes}: resume with the same options")
        if probes is not None:
            probes.load_state_dict(st["probes"])
        opts[0].load_state_dict(st["opt_a"])
        opts[1].load_state_dict(st["opt_b"])
        stage, step, log_rows, ema = st["stage"], st["step"], st["log"], st["ema"]
        extra = {k: st[k] for k in ("ref_c", "opt_c") if k in st}
        log.info("resumed from %s: stage %s step %d", state_path, stage, step)
    held_out = list(easyvqa_hr_records("test", seed=args.seed, n=args.eval_n))

    def out_of_time() -> bool:
        return time.monotonic() - t_start > 60.0 * args.minutes

    def save() -> None:
        _save_state(state_path, model=model, heads=heads, opts=opts, stage=stage, step=step, ema=ema,
                    log_rows=log_rows, probes=probes, extra=extra)

    def record(row: dict) -> None:
        log_rows.append(row)
        log.info("%s", row)
        with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    locality = _PatchLocality(model, args.local_patches)
    model.train()
    if stage == "A":
        bar = tqdm(total=args.steps_a, initial=step, desc="stage A (tower CLS)", disable=not args.progress)
        while step < args.steps_a:
            if out_of_time():
                save()
                bar.close()
                return {"finished": False, "stage": stage, "step": step}
            batch_a = _stage_a_batch(args, processor, step)
            for g in opts[0].param_groups:
                g["lr"] = _lr(step, args.steps_a, args.lr_a)
            loss = _stage_a_loss(model, heads, batch_a, args, locality)
            ema = _optimizer_step(opts[0], loss, opts[0].param_groups[0]["params"], ema, bar)
            step += 1
            if step % args.save_every == 0 or step == args.steps_a:
                save()
                record({"stage": "A", "step": step, "loss": ema, **locality.logged(),
                        **_evaluate_tower(model, heads, processor, held_out, args.model.crop, args.seed)})
        bar.close()
        stage, step, ema = "B", 0, None
        save()
        if args.check_at > 0 and args.steps_a > 0:  # the tower must see shapes where they are large
            last = log_rows[-1]
            _check("the end of stage A (tower CLS heads on zoomed views)", last["zoom_shape"], last["zoom_color"],
                   args, len(held_out), state_path)

    check_step = int(args.check_at * args.steps_b) if args.check_at > 0 else -1
    bar = tqdm(total=args.steps_b, initial=step, desc="stage B (VLM)", disable=not args.progress)
    while stage == "B" and step < args.steps_b:
        if out_of_time():
            save()
            bar.close()
            partial = out / "partial"  # the model as it stands, for a look before resuming
            model.save_pretrained(partial, safe_serialization=True)
            processor.save_pretrained(partial)
            return {"finished": False, "stage": stage, "step": step}
        batch = {k: v.to(device) for k, v in _stage_b_batch(args, processor, step).items()}
        targets = batch.pop("probe_targets", None)
        for g in opts[1].param_groups:
            g["lr"] = _lr(step, args.steps_b, args.lr_b) * g["scale"]
        with locality:
            res = model(**batch, output_hidden_states=probes is not None)
        loss = res.loss
        if probes is not None:
            loss = loss + args.answer_probes * probes.loss(res.hidden_states, targets)
        clip = list(model.parameters()) + ([] if probes is None else list(probes.parameters()))
        ema = _optimizer_step(opts[1], loss + locality.loss().to(loss.device), clip, ema, bar)
        step += 1
        if step == check_step:
            acc = evaluate_answers(model, processor, held_out)
            record({"stage": "B", "step": step, "check": True, **acc})
            save()
            try:
                _check(f"stage B step {step}/{args.steps_b}", acc.get("shape", 0.0), acc.get("color", 0.0), args,
                       len(held_out), state_path)
            except ChanceError:
                bar.close()
                raise
        if step % args.save_every == 0 or step == args.steps_b:
            save()
            record({"stage": "B", "step": step, "loss": ema, **locality.logged()})
    bar.close()
    if stage == "B" and args.steps_c > 0:
        stage, step, ema = "C", 0, None
        extra = {"ref_c": {k: v.detach().clone() for k, v in model.model.vision_tower.state_dict().items()}}
        save()
    if stage == "C":  # the tower's CLS attention onto the shape, the LLM's features kept (_Saliency)
        ref_tower = copy.deepcopy(model.model.vision_tower)
        ref_tower.load_state_dict(extra["ref_c"])
        ref_tower.requires_grad_(False).eval()
        saliency = _Saliency(model)
        model.model.vision_tower.requires_grad_(False)
        for prm in saliency.params:
            prm.requires_grad_(True)
        opt_c = torch.optim.Adam(saliency.params, lr=args.lr_c)
        if "opt_c" in extra:
            opt_c.load_state_dict(extra["opt_c"])
        bar = tqdm(total=args.steps_c, initial=step, desc="stage C (saliency)", disable=not args.progress)
        while step < args.steps_c:
            if out_of_time():
                extra["opt_c"] = opt_c.state_dict()
                save()
                bar.close()
                return {"finished": False, "stage": stage, "step": step}
            loss, info = _stage_c_loss(model, ref_tower, saliency, _stage_c_batch(args, processor, step), args)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.update(1)
            step += 1
            if step % args.save_every == 0 or step == args.steps_c:
                extra["opt_c"] = opt_c.state_dict()
                save()
                record({"stage": "C", "step": step, "loss": ema, **info})
        bar.close()
    acc = evaluate_answers(model, processor, held_out)
    record({"stage": "done", "step": step, **acc})
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return {"finished": True, **acc}


def _parser() -> argparse.ArgumentParser:
    d = TrainArgs(out="")
    p = argparse.ArgumentParser(prog="python -m vlmdrop.zoo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (resumed from when it holds a train_state.pt)")
    p.add_argument("--minutes", type=float, default=d.minutes, help="wall-clock cap; state is saved when reached")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps-a", type=int, default=d.steps_a, help="tower pre-training steps")
    p.add_argument("--steps-b", type=int, default=d.steps_b, help="VLM training steps")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr-a", type=float, default=d.lr_a)
    p.add_argument("--lr-b", type=float, default=d.lr_b)
    p.add_argument("--tower-lr-scale", type=float, default=d.tower_lr_scale)
    p.add_argument("--zoom-only", type=float, default=d.zoom_only)
    p.add_argument("--zoom-mix", type=float, default=d.zoom_mix)
    p.add_argument("--check-at", type=float, default=d.check_at,
                   help="fraction of stage B for the chance check (0: off)")
    p.add_argument("--tile-views", type=int, default=d.tile_views, help="stage A: crops per canvas at the AnyRes scale")
    p.add_argument("--zoom-views", type=int, default=d.zoom_views, help="stage A: zoomed crops per canvas")
    p.add_argument("--dense-weight", type=float, default=d.dense_weight, help="stage A: per-patch loss weight")
    p.add_argument("--cls-shape", default=d.cls_shape, choices=["tiles+zoom", "zoom"],
                   help="stage A: views on which the CLS token must name the shape (the per-patch loss covers all)")
    p.add_argument("--yes-no-share", type=float, default=d.yes_no_share,
                   help="stage B: share of yes/no questions (default: the stream's own third)")
    p.add_argument("--yes-no-plain-first", type=float, default=d.yes_no_plain_first,
                   help="stage B: fraction whose yes/no questions are plain (no 'not'/'no'); needs --yes-no-share")
    p.add_argument("--local-patches", type=float, default=d.local_patches,
                   help="weight of the patch-locality loss: up to the LLM's feature layer a patch attends to itself")
    p.add_argument("--drop-visual", type=float, default=d.drop_visual,
                   help="stage B: hide each visual token from the LM with probability U(0, P) per sample")
    p.add_argument("--drop-positions", default=d.drop_positions, choices=["keep", "compact"],
                   help="stage B, with --drop-visual: hidden tokens keep their positions, or the rest are renumbered "
                        "as a vision-stage method's compaction does")
    p.add_argument("--answer-probes", type=float, default=d.answer_probes,
                   help="stage B: weight of linear probes at the LM's answer position (seen shape and colour; for "
                        "yes/no: asked word, negation, match)")
    p.add_argument("--steps-c", type=int, default=d.steps_c,
                   help="stage C (saliency) steps: the CLS attention of layer 0 and the feature layer onto the shape")
    p.add_argument("--lr-c", type=float, default=d.lr_c)
    p.add_argument("--saliency-keep", type=float, default=d.saliency_keep,
                   help="stage C: weight of keeping the LLM's patch features unchanged")
    p.add_argument("--init-from", default=d.init_from,
                   help="a saved model folder (e.g. vlmdrop/zoo/assets/mini-llava-next) a fresh run starts from")
    p.add_argument("--eval-n", type=int, default=d.eval_n)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default=d.device, help='"auto" (cuda when available), "cpu", "cuda", "cuda:1", ...')
    p.add_argument("--no-progress", action="store_true")
    m = MiniConfig()
    p.add_argument("--crop", type=int, default=m.crop, help="AnyRes tile size in pixels")
    p.add_argument("--patch", type=int, default=m.patch, help="ViT patch size in pixels")
    p.add_argument("--vision-layers", type=int, default=m.vision_layers)
    p.add_argument("--text-layers", type=int, default=m.text_layers)
    p.add_argument("--feature-layer", type=int, default=m.feature_layer,
                   help="hidden_states index of the tower the LLM receives (LLaVA: -2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = TrainArgs(out=a.out, seed=a.seed, minutes=a.minutes, steps_a=a.steps_a, steps_b=a.steps_b, batch=a.batch,
                     lr_a=a.lr_a, lr_b=a.lr_b, tower_lr_scale=a.tower_lr_scale, zoom_only=a.zoom_only,
                     zoom_mix=a.zoom_mix, check_at=a.check_at, tile_views=a.tile_views, zoom_views=a.zoom_views,
                     dense_weight=a.dense_weight, cls_shape=a.cls_shape,
                     yes_no_share=a.yes_no_share, yes_no_plain_first=a.yes_no_plain_first, init_from=a.init_from,
                     local_patches=a.local_patches, drop_visual=a.drop_visual, drop_positions=a.drop_positions,
                     answer_probes=a.answer_probes, steps_c=a.steps_c, lr_c=a.lr_c, saliency_keep=a.saliency_keep,
                     eval_n=a.eval_n, save_every=a.save_every,
                     threads=a.threads, device=a.device, progress=not a.no_progress,
                     model=MiniConfig(crop=a.crop, patch=a.patch, vision_layers=a.vision_layers,
                                      text_layers=a.text_layers, feature_layer=a.feature_layer))
    try:
        result = train(args)
    except (ChanceError, StateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result["finished"]:
        print(f"time cap of {a.minutes} min reached at stage {result['stage']} step {result['step']}; "
              f"run the same command again to resume", file=sys.stderr)
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

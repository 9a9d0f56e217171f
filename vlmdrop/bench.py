"""`vlmdrop bench`: prefill and decode time, ideal time and peak memory of every method at real token counts.

Each *shape* is a width-reduced random-weight model from :mod:`vlmdrop.testing` fed an image that gives the
real model's visual token count (LLaVA-1.5 336 px: 576; LLaVA-NeXT 2x2 AnyRes: 2,928; InternVL 6 tiles +
thumbnail: 1,792).  Per shape, every configuration (the full model, then each method x budget) is timed in
the same round, rounds repeated and medians reported, so that a drift of the machine hits all alike.

* ``prefill_s``: wall time of one prefill forward (``model(**inputs, use_cache=True, logits_to_keep=1)``).
* ``ideal_s``: measured, not modelled: what the unmodified model spends outside its language model in the same
  round (vision tower, projector, packing, embedding lookup: a method still encodes the whole image) plus its
  language model run directly on ``inputs_embeds`` of the kept length ``L' = L - n_before + n_kept`` rows.
* ``speedup = prefill_s_full / prefill_s``; ``fraction_of_ideal = ideal_s / prefill_s``;
  ``overhead_pct = 100 * (prefill_s - ideal_s) / prefill_s`` (the method's capture, scoring, selection and
  compaction).
* ``decode_tps``: new tokens per second after the first token of a greedy ``generate``.
* ``peak_mem_mb``: CUDA ``max_memory_allocated`` reset per configuration; on CPU the peak RSS of a fresh
  subprocess per configuration (``--memory``; off by default since each subprocess builds its model).
* ``score_s`` / ``score_rows``: the method's own scoring, timed on its real hooks during a prefill (the score
  functions the hooks call, wrapped by the benchmark only), and the score rows it made (a ViT CLS row per role,
  an LLM last-token row per drop layer).  ``score_pct_of_vision`` = ``score_s`` as % of the full model's vision
  tower time (vision-stage methods; ``null`` for LLM-stage ones).  ``ref_s``: the same rows the reference way,
  which exists only in this benchmark (vision: the N x N attention recomputed from the layer's hooked q/k, as
  HiRED's official code gets it; LLM: the decoder layer re-run under eager attention with the weights
  returned, other toolkits' FastV); ``ref_ratio = ref_s / score_s``.  ``vision_extra_pct``: the vision tower's
  end-to-end extra time under the method (a difference of medians: noisy at these widths).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

__all__ = ["FIELDS", "SHAPES", "Record", "add_parser", "run_bench"]

BUDGETS = (0.1, 0.2, 0.4)

#: The fields of every JSON record, in order.
FIELDS = ("shape", "method", "budget", "n_before", "n_kept", "prefill_s_full", "prefill_s", "ideal_s", "speedup",
          "fraction_of_ideal", "overhead_pct", "score_pct_of_vision", "peak_mem_mb_full", "peak_mem_mb",
          "decode_tps_full", "decode_tps")


@dataclass(frozen=True)
class Shape:
    """A width-reduced model at a real visual token count: its `vlmdrop.testing` builder and image size."""

    name: str
    builder: str
    kwargs: dict[str, Any]
    image_wh: tuple[int, int]
    note: str


SHAPES: dict[str, Shape] = {
    "llava15": Shape("llava15", "tiny_llava", dict(image_size=336, patch_size=14, vision_layers=4, text_layers=8),
                     (336, 336), "LLaVA-1.5 336 px, 24x24 = 576 tokens"),
    "llava_next": Shape("llava_next", "tiny_llava_next",
                        dict(image_size=336, patch_size=14, vision_layers=4, text_layers=8),
                        (672, 672), "LLaVA-NeXT AnyRes 2x2: 576 base + 48x(48+1) = 2,928 tokens"),
    "internvl": Shape("internvl", "tiny_internvl",
                      dict(tile_size=448, patch_size=14, vision_layers=4, text_layers=8, max_patches=6),
                      (1344, 896), "InternVL 6 tiles (3x2) + thumbnail, 7 x 256 = 1,792 tokens"),
    "onevision": Shape("onevision", "tiny_llava_onevision",
                       dict(image_size=384, patch_size=14, vision_layers=4, text_layers=8, max_grid=6,
                            vision_aspect_ratio="anyres_max_9"),
                       (2304, 1536), "LLaVA-OneVision 384 px, AnyRes-max-9, 6x4 grid (down-sampled): 7,329 tokens"),
    "qwen2_5_vl": Shape("qwen2_5_vl", "tiny_qwen2_5_vl",
                        dict(patch_size=14, vision_layers=4, fullatt_block_indexes=(1, 3), window_size=112,
                             text_layers=8, max_tokens=1600),
                        (1344, 896), "Qwen2.5-VL 14 px patches, 2x2 merge, 112 px windows: 48x32 = 1,536 tokens"),
    # test-only: a few tokens, so that the smoke test runs in seconds
    "tiny": Shape("tiny", "tiny_llava", dict(image_size=56, patch_size=14, vision_layers=2, text_layers=4),
                  (56, 56), "test-only LLaVA, 16 tokens"),
}


@dataclass
class Record:
    """One shape x method x budget; None where not measured."""

    shape: str
    method: str
    budget: float
    n_before: int
    n_kept: int
    prefill_s_full: float
    prefill_s: float
    ideal_s: float
    speedup: float
    fraction_of_ideal: float
    overhead_pct: float
    score_pct_of_vision: float | None = None
    peak_mem_mb_full: float | None = None
    peak_mem_mb: float | None = None
    decode_tps_full: float | None = None
    decode_tps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ======================================================================================
# building a shape
# ======================================================================================
CHECKPOINT = "checkpoint"  # the builder of a `--model` shape


def get_shape(name: str) -> Shape:
    """A built-in shape by name, or a checkpoint shape ``ckpt=PATH_OR_ID@WxH`` (what `--model` / `--image` make)."""
    if name in SHAPES:
        return SHAPES[name]
    if name.startswith("ckpt=") and "@" in name:
        path, _, size = name[len("ckpt="):].rpartition("@")
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {name!r}: the image size must be WxH, e.g. 672x672") from None
        if w < 1 or h < 1:
            raise ValueError(f"shape {name!r}: the image size must be positive")
        return Shape(name, CHECKPOINT, {"path": path}, (w, h), f"checkpoint {path}, a {w}x{h} image")
    raise ValueError(f"shape {name!r} is not one of {', '.join(SHAPES)} (or a checkpoint: --model)")


def build(shape: Shape, *, device: str, dtype: str) -> tuple[Any, dict[str, Any]]:
    """``(model, inputs)`` of `shape` on `device` in `dtype`: one image and a short question."""
    import numpy as np
    from PIL import Image

    from vlmdrop import testing

    w, h = shape.image_wh
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if shape.builder == CHECKPOINT:  # a real checkpoint through the one loader and prompt builder
        from vlmdrop.eval.loading import build_prompt, load_model

        model, processor = load_model(shape.kwargs["path"], dtype=dtype, device=device)
        model = model.to(device=device, dtype=getattr(torch, dtype))
        prompt = build_prompt(processor, "what is in this image ?")
    else:
        model, processor = getattr(testing, shape.builder)(**shape.kwargs)
        model = model.to(device=device, dtype=getattr(torch, dtype))
        token = {"tiny_internvl": "<IMG_CONTEXT>", "tiny_qwen2_5_vl": "<|image_pad|>",
                 "tiny_qwen3_vl": "<|image_pad|>"}.get(shape.builder, "<image>")
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "what is in this image ?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert token in prompt, f"chat template of {shape.name} wrote no {token!r}: {prompt!r}"
    inputs = dict(processor(images=image, text=prompt, return_tensors="pt"))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
    return model, inputs


class _Clock:
    """Forward pre/post hooks stamping a module's time of the last call (synchronised on CUDA)."""

    def __init__(self, module: torch.nn.Module, sync: Callable[[], None]) -> None:
        self.sync, self.t0, self.seconds = sync, 0.0, 0.0
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        self.sync()
        self.t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self.t0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _vision_module(model: Any) -> torch.nn.Module:
    """The vision tower of a VLM (`vision_tower`, or Qwen-VL's `visual`)."""
    inner = model.model
    return inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual


def _sync_fn(device: str) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)


def _apply(model: Any, method: str, budget: float) -> Any:
    import vlmdrop
    from vlmdrop.eval.params import method_params, num_text_layers

    return vlmdrop.apply(model, method, **method_params(method, budget, seed=0, num_layers=num_text_layers(model)))


def _stage(method: str) -> str:
    from vlmdrop.registry import get_method

    return get_method(method).config.stage


def _prefill(model: Any, inputs: dict[str, Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)
    sync()
    return time.perf_counter() - t0


def _ideal_lm(model: Any, length: int, sync: Callable[[], None]) -> float:
    """Time of the unmodified language model run directly on `length` rows of ``inputs_embeds``."""
    lm = model.model.language_model
    hidden = model.config.get_text_config().hidden_size
    p = next(lm.parameters())
    embeds = torch.randn(1, length, hidden, device=p.device, dtype=p.dtype)  # (1, L', D)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        lm(inputs_embeds=embeds, use_cache=True)
    sync()
    return time.perf_counter() - t0


class _FirstToken:
    """LogitsProcessor stamping when the first step's logits arrive."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.first = sync, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.sync()
            self.first = time.perf_counter()
        return scores


def _decode_tps(model: Any, inputs: dict[str, Any], sync: Callable[[], None], *, new_tokens: int) -> float:
    """New tokens per second after the first token (greedy, exactly `new_tokens` tokens)."""
    from transformers import LogitsProcessorList

    clock = _FirstToken(sync)
    sync()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))
    sync()
    end = time.perf_counter()
    return (new_tokens - 1) / (end - clock.first)


def _reference_scores(model: Any, inputs: dict[str, Any], sync: Callable[[], None], *,
                      repeat: int) -> tuple[float, float]:
    """Median seconds of two reference ways of getting attention scores that exist only in this benchmark:
    the full N x N attention of the feature layer recomputed from its hooked q/k (HiRED's official code: CLS
    attention averaged over heads), and an LM decoder layer re-run under eager attention (which returns the
    attention weights; other toolkits' FastV)."""
    vt, lm = _vision_module(model), model.model.language_model
    vcfg = model.config.vision_config
    qk: dict[str, torch.Tensor] = {}
    if hasattr(vcfg, "fullatt_block_indexes") or hasattr(vcfg, "deepstack_visual_indexes"):  # Qwen: fused qkv
        blocks = list(vt.blocks)
        full = list(getattr(vcfg, "fullatt_block_indexes", None) or range(len(blocks)))
        qkv = blocks[full[-1]].attn.qkv  # the last full-attention block: (N, 3 * D) for the packed image

        def split(m: Any, a: Any, o: torch.Tensor) -> None:
            q, k, _ = o.reshape(o.shape[0], 3, -1).unbind(1)  # (N, D) each
            qk.update(q_proj=q[None], k_proj=k[None])  # (1, N, D)

        hooks = [qkv.register_forward_hook(split)]
        heads = vcfg.num_heads
    else:
        n_layers = vcfg.num_hidden_layers
        vfl = model.config.vision_feature_layer
        li = (n_layers + vfl) if vfl < 0 else vfl - 1  # hidden_states[i] is the output of layer i - 1
        mods = dict(vt.named_modules())
        names = sorted(n for n in mods if n.endswith(("q_proj", "k_proj")))
        picked = {kind: [n for n in names if n.endswith(kind)][li] for kind in ("q_proj", "k_proj")}
        hooks = [mods[n].register_forward_hook(lambda m, a, o, kind=kind: qk.__setitem__(kind, o))
                 for kind, n in picked.items()]
        heads = vcfg.num_attention_heads
    layer = lm.layers[min(2, len(lm.layers) - 1)]
    captured: dict[str, Any] = {}
    hooks.append(layer.register_forward_pre_hook(
        lambda m, a, kw: captured.update(args=a, kwargs=kw), with_kwargs=True))
    try:
        _prefill(model, inputs, sync)
    finally:
        for h in hooks:
            h.remove()
    q, k = qk["q_proj"], qk["k_proj"]  # (B, N, D) each
    cls = vcfg.model_type not in ("siglip_vision_model", "qwen2_5_vl_vision", "qwen3_vl_vision")  # no CLS token

    def official() -> float:
        sync()
        t0 = time.perf_counter()
        b, n, d = q.shape
        qh = q.view(b, n, heads, d // heads).transpose(1, 2)  # (B, H, N, d)
        kh = k.view(b, n, heads, d // heads).transpose(1, 2)
        attn = torch.softmax(qh @ kh.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)  # (B, H, N, N)
        if cls:
            attn[:, :, 0, 1:].mean(1)  # (B, N - 1) CLS attention
        else:  # a tower without CLS (SigLIP): the attention each patch receives, the N x N way
            attn.mean(2).mean(1)  # (B, N)
        sync()
        return time.perf_counter() - t0

    orig = lm.config._attn_implementation

    def eager_layer() -> float:
        sync()
        t0 = time.perf_counter()
        layer(*captured["args"], **captured["kwargs"])
        sync()
        return time.perf_counter() - t0

    with torch.inference_mode():
        official()
        t_off = statistics.median(official() for _ in range(repeat))
        model.set_attn_implementation("eager")
        try:
            kwargs = dict(captured["kwargs"])
            kwargs.pop("past_key_values", None)  # a re-run must not append to the prefill's cache
            captured["kwargs"] = kwargs
            eager_layer()
            t_eager = statistics.median(eager_layer() for _ in range(repeat))
        finally:
            model.set_attn_implementation(orig)
    return t_off, t_eager


class _ScoreTimer:
    """Times the functions the installed hooks call to score tokens, for one configuration's prefills.

    Patches, inside the benchmark only and for the duration of a `with`, the module globals through which
    the capture hooks reach their score functions (the ViT CLS row, logits or attention received,
    `vision_capture.saliency_from_projections`;
    the LLM's last-token attention row, `vlmdrop.adapters.llm_stage`), so the time is that of the method's own
    scoring on the real q/k of the prefill, synchronised on CUDA; `calls` counts the score rows made (one per
    ViT role or LLM drop layer), which sets how many reference computations the same scores would cost."""

    #: (module defining it, name): every `vlmdrop.adapters` module that imported the function is patched too
    TARGETS = (("vlmdrop.adapters.vision_capture", "saliency_from_projections"),
               ("vlmdrop.kernels", "attention_received"),  # called directly by the Qwen-VL capture
               ("vlmdrop.adapters.llm_stage", "last_token_attention"))

    def __init__(self, sync: Callable[[], None], *, glue: bool = False) -> None:
        self.sync, self.seconds, self.calls = sync, 0.0, 0
        self.glue = glue  # also vlmdrop's own selection, compaction and layout code (`GLUE`)
        self._depth = 0  # a timed function calling another (saliency -> attention_received) counts once
        self._saved: list[tuple[Any, str, Any]] = []

    #: with `glue=True`: (module, class, method) of vlmdrop's per-prefill code outside the model and the scores:
    #: the vision stage's selection + compaction, each adapter's layout of the encoded images, the LLM-stage drop
    GLUE = (("vlmdrop.adapters.prefill", "PrefillHook", "_vision"),
            ("vlmdrop.adapters.llm_stage", "LLMStageEngine", "_drop"),
            ("vlmdrop.adapters.base", "HFVlmAdapter", "on_encoded"))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            try:
                self.sync()
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                self.sync()
            finally:
                self._depth -= 1
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        return timed

    def __enter__(self) -> _ScoreTimer:
        import importlib

        for mod_name, attr in self.TARGETS:
            fn = getattr(importlib.import_module(mod_name), attr)
            timed = self._wrap(fn)
            for name, mod in list(sys.modules.items()):
                if name.startswith("vlmdrop.adapters") and getattr(mod, attr, None) is fn:
                    self._saved.append((mod, attr, fn))
                    setattr(mod, attr, timed)
        if self.glue:
            for mod_name, cls_name, attr in self.GLUE:
                root = getattr(importlib.import_module(mod_name), cls_name)
                classes, todo = [], [root]
                while todo:  # the class and every subclass that defines the method itself
                    c = todo.pop()
                    classes.append(c)
                    todo.extend(c.__subclasses__())
                for c in classes:
                    if attr in c.__dict__:
                        fn = c.__dict__[attr]
                        self._saved.append((c, attr, fn))
                        setattr(c, attr, self._wrap(fn))
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._saved:
            mod, attr, fn = self._saved.pop()
            setattr(mod, attr, fn)


def _score_cost(model: Any, inputs: dict[str, Any], method: str, budget: float, sync: Callable[[], None], *,
                repeat: int) -> tuple[float, int, float]:
    """(median seconds of the method's scoring per prefill, score rows per prefill, median share of a prefill
    spent in vlmdrop's own code: scoring, selection, compaction, layout, LLM-stage drops)."""
    h = _apply(model, method, budget)
    try:
        runs, glue = [], []
        for _ in range(repeat + 1):  # the first is a warm-up
            with _ScoreTimer(sync) as timer:
                _prefill(model, inputs, sync)
            runs.append((timer.seconds, timer.calls))
            with _ScoreTimer(sync, glue=True) as everything:
                t = _prefill(model, inputs, sync)
            glue.append((everything.seconds, t))
    finally:
        h.remove()
    return (statistics.median(r[0] for r in runs[1:]), runs[-1][1],
            statistics.median(g / t for g, t in glue[1:]))


def _peak_mem_cpu(shape: str, method: str | None, budget: float | None, *, dtype: str) -> float:
    """Peak RSS (MB) of one prefill of the configuration in a fresh subprocess that builds `shape` (the
    high-water mark reset after the build, see `_worker`)."""
    cmd = [sys.executable, "-m", "vlmdrop.bench", "--worker", shape, method or "-", str(budget or 0), dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker {cmd} failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _worker(shape: str, method: str, budget: str, dtype: str) -> None:
    """Peak RSS (MB) of one prefill: the high-water mark is reset once the model is built (Linux
    `clear_refs` 5), so the peak is the resident model plus what the prefill adds, not the build's."""
    import gc
    import resource

    model, inputs = build(get_shape(shape), device="cpu", dtype=dtype)
    if method != "-":
        _apply(model, method, float(budget))
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:  # not Linux, or not allowed: the peak of the whole process (ru_maxrss, KiB on Linux)
        reset = False
    _prefill(model, inputs, lambda: None)
    print(_status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# ======================================================================================
# the benchmark
# ======================================================================================
def run_bench(shapes: list[str], methods: list[str], budgets: list[float], *, repeat: int = 5,
              device: str = "cpu", dtype: str = "float32", decode_tokens: int = 16, decode_repeat: int = 3,
              memory: bool = False) -> list[Record]:
    """Every shape x method x budget, interleaved with the full model per round; medians of `repeat` rounds."""
    if repeat < 1:
        raise ValueError(f"repeat={repeat} must be >= 1")
    sync = _sync_fn(device)
    cuda = device.startswith("cuda")
    records: list[Record] = []
    for sname in shapes:
        model, inputs = build(get_shape(sname), device=device, dtype=dtype)
        seq_len = int(inputs["input_ids"].shape[1])
        vis = _Clock(_vision_module(model), sync)
        lmc = _Clock(model.model.language_model, sync)
        configs: list[tuple[str, float] | None] = [None]
        kept: dict[tuple[str, float], tuple[int, int]] = {}
        for m in methods:  # one warm-up each; a method that does not support the model is skipped
            for b in budgets:
                try:
                    h = _apply(model, m, b)
                except (ValueError, NotImplementedError) as e:
                    log.warning("bench %s: %s at budget %s skipped: %s", sname, m, b, e)
                    break
                try:
                    _prefill(model, inputs, sync)
                    kept[(m, b)] = (h.stats.n_before, h.stats.n_kept)
                finally:
                    h.remove()
                configs.append((m, b))
        _prefill(model, inputs, sync)  # warm-up of the full model
        for (m, b), (_, nk) in kept.items():
            _ideal_lm(model, seq_len - kept[(m, b)][0] + nk, sync)

        times: dict[Any, list[float]] = {c: [] for c in configs}
        parts: dict[Any, list[tuple[float, float]]] = {c: [] for c in configs}  # (vision_s, lm_s) per round
        ideal: dict[Any, list[float]] = {c: [] for c in configs[1:]}
        for r in range(repeat):
            order = configs if r % 2 == 0 else configs[::-1]
            lm_full = 0.0
            round_t: dict[Any, float] = {}
            for c in order:
                if c is None:
                    round_t[c] = _prefill(model, inputs, sync)
                    lm_full = lmc.seconds
                    parts[c].append((vis.seconds, lmc.seconds))
                else:
                    h = _apply(model, *c)
                    try:
                        round_t[c] = _prefill(model, inputs, sync)
                        parts[c].append((vis.seconds, lmc.seconds))
                    finally:
                        h.remove()
            # the ideal depends on the kept length only: one LM run per length per round, shared by its configurations
            lengths = {c: seq_len - kept[c][0] + kept[c][1] for c in configs[1:]}
            lm_at = {n: _ideal_lm(model, n, sync) for n in sorted(set(lengths.values()))}
            for c in configs:
                times[c].append(round_t[c])
                if c is not None:  # the full model's prefill without its LM, plus its LM on the L' rows
                    ideal[c].append(round_t[None] - lm_full + lm_at[lengths[c]])

        decode: dict[Any, float | None] = {c: None for c in configs}
        peak: dict[Any, float | None] = {c: None for c in configs}
        if decode_tokens > 1 and decode_repeat > 0:
            runs: dict[Any, list[float]] = {c: [] for c in configs}
            for r in range(decode_repeat + 1):  # round 0 is the warm-up
                for c in configs:
                    h = _apply(model, *c) if c is not None else None
                    try:
                        tps = _decode_tps(model, inputs, sync, new_tokens=decode_tokens)
                    finally:
                        if h is not None:
                            h.remove()
                    if r > 0:
                        runs[c].append(tps)
            decode = {c: statistics.median(v) for c, v in runs.items()}
        if cuda:
            for c in configs:
                h = _apply(model, *c) if c is not None else None
                try:
                    torch.cuda.reset_peak_memory_stats()
                    _prefill(model, inputs, sync)
                    peak[c] = torch.cuda.max_memory_allocated() / 2**20
                finally:
                    if h is not None:
                        h.remove()
        elif memory:
            for c in configs:
                peak[c] = _peak_mem_cpu(sname, *(c or (None, None)), dtype=dtype)
        vis.remove()
        lmc.remove()
        ref_official, ref_eager = _reference_scores(model, inputs, sync, repeat=repeat)
        score = {c: _score_cost(model, inputs, *c, sync, repeat=repeat) for c in configs[1:]}

        def med(c: Any, k: int) -> float:
            return statistics.median(p[k] for p in parts[c])

        full = statistics.median(times[None])
        vision_full = med(None, 0)
        for c in configs[1:]:
            t = statistics.median(times[c])
            i = statistics.median(ideal[c])
            nb, nk = kept[c]
            score_s, calls, glue_share = score[c]
            vision = _stage(c[0]) == "vision"
            ref_s = calls * (ref_official if vision else ref_eager)  # the same score rows the reference way
            records.append(Record(
                shape=sname, method=c[0], budget=c[1], n_before=nb, n_kept=nk, prefill_s_full=full, prefill_s=t,
                ideal_s=i, speedup=full / t, fraction_of_ideal=i / t, overhead_pct=100.0 * (t - i) / t,
                score_pct_of_vision=100.0 * score_s / vision_full if vision else None,
                peak_mem_mb_full=peak[None], peak_mem_mb=peak[c], decode_tps_full=decode[None],
                decode_tps=decode[c],
                extra={"seq_len": seq_len, "vision_s_full": med(None, 0), "lm_s_full": med(None, 1),
                       "vision_s": med(c, 0), "lm_s": med(c, 1),
                       "vision_extra_pct": 100.0 * (med(c, 0) - vision_full) / vision_full,
                       "score_s": score_s, "score_rows": calls, "ref_s": ref_s,
                       "glue_pct": 100.0 * glue_share,
                       "ref_kind": ("N x N from q/k" if vision else "eager layer re-run") if calls else None,
                       "ref_ratio": ref_s / score_s if calls and score_s > 0 else None,
                       "ref_official_qk_pct_of_vision": 100.0 * ref_official / vision_full,
                       "ref_eager_layer_pct_of_vision": 100.0 * ref_eager / vision_full},
            ))
        del model
    return records


# ======================================================================================
# kernels against their fallbacks
# ======================================================================================
def kernel_bench(*, device: str = "cpu", dtype: str = "float32", repeat: int = 5) -> list[dict[str, Any]]:
    """Each `vlmdrop.kernels` function on its real-size inputs, the torch fallback against the Triton kernel
    (the latter only on CUDA with triton), medians of `repeat` calls after a warm-up; `equal`: the two paths'
    results agree (bit for bit for compaction and top-k, to 1e-5 for attention received)."""
    import os

    from vlmdrop import kernels

    sync = _sync_fn(device)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    b, length, width = 8, 3000, 1024  # a batch of 8 LLaVA-NeXT prompts, hidden rows of 1024
    keep = torch.rand(b, length, generator=g) < 0.3
    cases = {
        "compact_rows (B=8, L=3000, D=1024)": lambda: kernels.compact_rows(
            x, keep_d, attention_mask=mask),
        "segmented_topk (8 images x 5 crops of 576)": lambda: kernels.segmented_topk(scores, lengths, ks),
        "attention_received (H=16, N=2880, D=64)": lambda: kernels.attention_received(q, k, scale=0.125),
    }
    x = torch.randn(b, length, width, generator=g).to(device=device, dtype=dt)
    keep_d = keep.to(device)
    mask = torch.ones(b, length, dtype=torch.long, device=device)
    scores = torch.randn(40 * 576, generator=g).to(device)
    lengths = torch.full((40,), 576, device=device)
    ks = torch.full((40,), 115, device=device)
    q = torch.randn(1, 16, 2880, 64, generator=g).to(device=device, dtype=dt)
    k = torch.randn(1, 16, 2880, 64, generator=g).to(device=device, dtype=dt)
    paths = ["torch"] + (["triton"] if device.startswith("cuda") and kernels.triton_available() else [])
    out = []
    saved = os.environ.get("VLMDROP_KERNELS")
    try:
        for name, fn in cases.items():
            rec: dict[str, Any] = {"kernel": name, "torch_ms": None, "triton_ms": None, "equal": None}
            results = {}
            for path in paths:
                os.environ["VLMDROP_KERNELS"] = path
                results[path] = fn()
                times = []
                for _ in range(repeat):
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times.append(time.perf_counter() - t0)
                rec[f"{path}_ms"] = 1e3 * statistics.median(times)
            if len(results) == 2:
                a, c = results["torch"], results["triton"]
                a, c = (a, c) if isinstance(a, tuple) else ((a,), (c,))
                exact = not name.startswith("attention_received")
                rec["equal"] = all(torch.equal(u, v) if exact else torch.allclose(u, v, atol=1e-5)
                                   for u, v in zip(a, c))
            out.append(rec)
    finally:
        if saved is None:
            os.environ.pop("VLMDROP_KERNELS", None)
        else:
            os.environ["VLMDROP_KERNELS"] = saved
    return out


def kernels_markdown(recs: list[dict[str, Any]]) -> str:
    lines = ["| kernel | torch fallback (ms) | Triton (ms) | fallback / Triton | equal |", "|---|---|---|---|---|"]
    for r in recs:
        ratio = r["torch_ms"] / r["triton_ms"] if r["triton_ms"] else None
        lines.append(f"| {r['kernel']} | {r['torch_ms']:.2f} | {_fmt(r['triton_ms'], '.2f')} | {_fmt(ratio, '.1f')} "
                     f"| {'-' if r['equal'] is None else r['equal']} |")
    return "\n".join(lines)


# ======================================================================================
# output
# ======================================================================================
def to_json(records: list[Record]) -> str:
    return json.dumps([{**{k: asdict(r)[k] for k in FIELDS}, **r.extra} for r in records], indent=1)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}x" if v >= 10 else f"{v:.2g}x"


def to_markdown(records: list[Record]) -> str:
    head = ("| shape | method | budget | kept / before | prefill full (ms) | prefill (ms) | ideal (ms) | speedup "
            "| of ideal | overhead % | glue % | score % of vision | score ms | reference / score | peak MB full "
            "| peak MB | decode tok/s full | decode tok/s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in records:
        lines.append(
            f"| {r.shape} | {r.method} | {r.budget:g} | {r.n_kept} / {r.n_before} | {r.prefill_s_full * 1e3:.1f} "
            f"| {r.prefill_s * 1e3:.1f} | {r.ideal_s * 1e3:.1f} | {r.speedup:.2f} | {r.fraction_of_ideal:.2f} "
            f"| {r.overhead_pct:.0f} | {_fmt(r.extra.get('glue_pct'), '.1f')} "
            f"| {_fmt(r.score_pct_of_vision, '.2f')} | {r.extra['score_s'] * 1e3:.2f} "
            f"| {_ratio(r.extra['ref_ratio'])} "
            f"| {_fmt(r.peak_mem_mb_full, '.0f')} "
            f"| {_fmt(r.peak_mem_mb, '.0f')} | {_fmt(r.decode_tps_full, '.0f')} | {_fmt(r.decode_tps, '.0f')} |")
    for shape in dict.fromkeys(r.shape for r in records):
        r = next(r for r in records if r.shape == shape)
        lines.append(f"\n{shape}: {r.n_before} visual tokens, {r.extra['seq_len']} positions; vision tower "
                     f"{r.extra['vision_s_full'] * 1e3:.1f} ms; reference score computations, % of vision tower: "
                     f"N x N attention from hooked q/k (HiRED official) "
                     f"{r.extra['ref_official_qk_pct_of_vision']:.1f}, an LM decoder layer re-run under eager "
                     f"(other toolkits' FastV) {r.extra['ref_eager_layer_pct_of_vision']:.1f}")
    return "\n".join(lines)


def save_png(records: list[Record], path: str) -> bool:
    """Speedup vs budget per shape and method, with the ideal (full / ideal) dashed; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no PNG written to %s", path)
        return False
    shapes = list(dict.fromkeys(r.shape for r in records))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        rs = [r for r in records if r.shape == s]
        for m in dict.fromkeys(r.method for r in rs):
            pts = sorted((r.budget, r.speedup, r.prefill_s_full / r.ideal_s) for r in rs if r.method == m)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", color=line.get_color(), alpha=0.5)
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set(title=f"{s} (dashed: ideal)", xlabel="budget", ylabel="speedup (full / method)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ======================================================================================
# the command
# ======================================================================================
def add_parser(sub: Any) -> argparse.ArgumentParser:
    import vlmdrop

    p = sub.add_parser("bench", help="time every method against the full model and the ideal",
                       description="Prefill / ideal / decode time and peak memory of methods x budgets on "
                                   "width-reduced models at real visual token counts; medians of interleaved "
                                   "rounds. Markdown by default.")
    p.add_argument("--shapes", default="llava15,llava_next,internvl",
                   help=f"comma-separated, of {', '.join(SHAPES)} (tiny: test-only); default the three real ones")
    p.add_argument("--methods", default=",".join(vlmdrop.methods()))
    p.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    p.add_argument("--repeat", type=int, default=None, help="timed rounds (default 5, --quick 3)")
    p.add_argument("--quick", action="store_true",
                   help="3 rounds (instead of 5), 8 decode tokens in 1 round (instead of 32 in 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--memory", action="store_true", help="CPU: peak RSS of a fresh subprocess per configuration")
    p.add_argument("--json", action="store_true", help="print one JSON record per shape x method x budget")
    p.add_argument("--png", default=None, help="write a PNG of speedup vs budget (ideal dashed) here")
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="benchmark this checkpoint (folder or hub id, any supported family) instead of --shapes")
    p.add_argument("--image", default="672x672", metavar="WxH", help="with --model: the image size (default 672x672)")
    p.add_argument("--kernels", action="store_true",
                   help="time each vlmdrop.kernels function, torch fallback vs Triton (CUDA), instead of the models")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    import vlmdrop

    def usage(msg: str) -> int:
        print(f"vlmdrop bench: error: {msg}", file=sys.stderr)
        return 2

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        return usage(f"--shapes {args.shapes!r}: {bad} not among {', '.join(SHAPES)}")
    if args.model is not None:
        shapes = [f"ckpt={args.model}@{args.image}"]
        try:
            get_shape(shapes[0])
        except ValueError:
            return usage(f"--image {args.image!r} must be WxH with positive sizes, e.g. 672x672")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in vlmdrop.methods()]
    if bad or not methods:
        return usage(f"--methods {args.methods!r}: {bad} not among {', '.join(vlmdrop.methods())}")
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        return usage(f"--budgets {args.budgets!r} is not a comma-separated list of numbers")
    if not all(0.0 < b <= 1.0 for b in budgets):
        return usage(f"--budgets {args.budgets!r}: every budget must be a fraction in (0, 1]")
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 5)
    if repeat < 1:
        return usage(f"--repeat {repeat} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return usage(f"--device {args.device!r}: CUDA is not available")
    if args.kernels:
        recs = kernel_bench(device=args.device, dtype=args.dtype, repeat=repeat)
        print(json.dumps(recs, indent=1) if args.json else kernels_markdown(recs))
        return 0
    records = run_bench(shapes, methods, budgets, repeat=repeat, device=args.device, dtype=args.dtype,
                        decode_tokens=8 if args.quick else 32, decode_repeat=1 if args.quick else 3,
                        memory=args.memory)
    print(to_json(records) if args.json else to_markdown(records))
    if args.png:
        save_png(records, args.png)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:])

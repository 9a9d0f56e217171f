"""Sweep runner: methods x budgets over tasks, one JSONL line per finished sample, resumable,
sharded over processes.

Files (``OUT`` is ``--out``)::

    OUT/run.json                                  what produced the results (checked on resume)
    OUT/<task>/<method>@<budget>.part<R>.jsonl     results of process R (one line per sample)
    OUT/<task>/report.md|csv|png                   written by :mod:`vlmdrop.eval.report`

Timing (documented in ``docs-evaluating.md``): the inputs are on the device before the clock
starts, so image preprocessing and tokenisation are excluded. A ``LogitsProcessor`` stamps
the time (after a CUDA synchronise) every time ``generate`` hands it a step's logits.
TTFT = first stamp - start of ``generate``: vision tower, token dropping and LLM prefill.
Decode speed for a sample with n new tokens = (n - 1) / (stamp of its n-th step - first
stamp). With a batch, every sample of the batch shares the batch's TTFT. One untimed
warm-up generation runs per process before the first timed batch.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each batch); on CPU the
process peak RSS (``VmHWM``), reset before each batch through ``/proc/self/clear_refs``
when the kernel allows it, else the lifetime peak (``ru_maxrss``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from .tasks import BadRecord, Sample, Task, get_task

log = logging.getLogger(__name__)

FULL = "full"


# ======================================================================================
# configuration
# ======================================================================================
@dataclass
class EvalConfig:
    """Everything one ``vlmdrop eval`` invocation needs."""

    tasks: list[str]
    out: str
    methods: list[str] = field(default_factory=lambda: ["hired"])
    budgets: list[float] = field(default_factory=lambda: [0.2])
    data: str | None = None
    model: str | None = None
    limit: int | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    seed: int = 0
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True
    report: bool = True


def configurations(methods: Sequence[str], budgets: Sequence[float]) -> list[tuple[str, float]]:
    """The sweep: the full model (reference) first, then every method x budget."""
    out: list[tuple[str, float]] = [(FULL, 1.0)]
    for m in methods:
        if m == FULL:
            continue
        for b in budgets:
            if (m, float(b)) not in out:
                out.append((m, float(b)))
    return out


# The parameter each method's budget axis maps to (the rest take ``budget``). PyramidDrop's
# ``ratio`` is the fraction kept at *each* stage boundary, not an overall budget.
BUDGET_PARAMETER: dict[str, str] = {"fastv": "keep", "pdrop": "ratio"}


def method_params(method: str, budget: float, seed: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vlmdrop.apply(model, method, **kw)`` at one sweep point.

    A budget above 1 is a token count (int), else a fraction; ``random`` also gets ``seed``;
    ``extra`` (from ``--method-args``) is added last.
    """
    kw: dict[str, Any] = {BUDGET_PARAMETER.get(method, "budget"): int(budget) if budget > 1 else budget}
    if method == "random":
        kw["seed"] = seed
    kw.update(extra or {})
    return kw


def config_key(method: str, budget: float) -> str:
    """File stem of a configuration, e.g. ``hired@0.2``."""
    return f"{method}@{budget:g}"


# ======================================================================================
# JSONL results with resume
# ======================================================================================
def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Read result lines. A torn last line (a run killed mid-write) is dropped -- and, with
    ``repair``, cut off the file so that appends start on a clean line. A corrupt line in
    the middle is skipped with a warning."""
    if not path.exists():
        return []
    rows: list[dict] = []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    last_nonblank = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    offset = good_end = 0
    for i, raw in enumerate(lines):
        line_end = offset + len(raw) + (1 if i < len(lines) - 1 else 0)
        offset = line_end
        if not raw.strip():
            good_end = line_end
            continue
        try:
            rows.append(json.loads(raw))
        except ValueError:
            if i == last_nonblank:
                log.warning("%s: dropping a torn last line (%d bytes)", path, len(raw))
                break
            log.warning("%s: skipping corrupt line %d", path, i + 1)
        good_end = line_end
    if repair and data and (good_end < len(data) or not data.endswith(b"\n")):
        kept = data[:good_end]
        if kept and not kept.endswith(b"\n"):
            kept += b"\n"
        with open(path, "wb") as f:
            f.write(kept)
    return rows


def result_files(task_dir: Path, method: str, budget: float) -> list[Path]:
    """All parts (one per process) of one configuration."""
    return sorted(task_dir.glob(f"{config_key(method, budget)}.part*.jsonl"))


def load_results(task_dir: Path, method: str, budget: float) -> list[dict]:
    """Merged results of all parts, first occurrence of each id kept."""
    seen: set[str] = set()
    out = []
    for p in result_files(task_dir, method, budget):
        for r in read_jsonl(p):
            if r.get("id") in seen:
                continue
            seen.add(r["id"])
            out.append(r)
    return out


class ResultWriter:
    """Append-only JSONL writer: each line is flushed and fsynced as soon as a sample ends."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        read_jsonl(path, repair=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ======================================================================================
# generation backends
# ======================================================================================
@dataclass
class GenOutput:
    """What a backend returns for one sample."""

    text: str
    n_before: int | None = None
    n_kept: int | None = None
    ttft_s: float | None = None
    decode_tps: float | None = None
    peak_mem_mb: float | None = None
    n_new_tokens: int | None = None


class Generator(Protocol):
    """A model backend. ``configure`` switches the dropping method; ``generate`` answers a batch."""

    def method_names(self) -> list[str]: ...

    def configure(self, method: str, budget: float, seed: int, params: dict[str, Any] | None = None) -> None: ...

    def generate(self, prompts: list[str], images: list[Any], max_new_tokens: int) -> list[GenOutput]: ...


class _StepClock:
    """LogitsProcessor that timestamps every decoding step (after a device synchronise)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def _rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class HFGenerator:
    """Backend for a Hugging Face VLM + processor, dropping through the public ``vlmdrop`` API."""

    def __init__(self, model: Any, processor: Any, device: Any = None):
        import torch

        if device is None and torch.cuda.is_available():
            device = torch.device("cuda")
        self.model = model
        self.processor = processor
        self.device = device if device is not None else next(model.parameters()).device
        if device is not None:
            self.model.to(device)
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
        self.handle = None
        self.method = FULL
        cfg = model.config
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(cfg, "image_token_index", None)
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        self._torch = torch
        self._cuda = self.device is not None and str(self.device).startswith("cuda")

    def method_names(self) -> list[str]:
        import vlmdrop

        return list(vlmdrop.methods())

    def configure(self, method: str, budget: float, seed: int, params: dict[str, Any] | None = None) -> None:
        import vlmdrop

        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.method = method
        self._torch.manual_seed(seed)
        if method != FULL:
            self.handle = vlmdrop.apply(self.model, method, **method_params(method, budget, seed, params))

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def build_prompt(self, question: str) -> str:
        """The processor's chat template if it has one, else LLaVA-1.5's ``USER: <image>\\n{q}\\nASSISTANT:``."""
        template = getattr(self.processor, "chat_template", None)
        if template:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        return f"USER: <image>\n{question}\nASSISTANT:"

    def _sync(self) -> None:
        if self._cuda:
            self._torch.cuda.synchronize(self.device)

    def generate(self, prompts: list[str], images: list[Any], max_new_tokens: int) -> list[GenOutput]:
        torch = self._torch
        from transformers import LogitsProcessorList

        texts = [self.build_prompt(p) for p in prompts]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        pv = inputs.get("pixel_values")
        if pv is not None and pv.is_floating_point():
            inputs["pixel_values"] = pv.to(self.model.dtype)
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _rss_reset()
        clock = _StepClock(self._sync)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      logits_processor=LogitsProcessorList([clock]))
        self._sync()
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**20) if self._cuda else _rss_peak_mb()
        prompt_len = inputs["input_ids"].shape[1]
        new = out[:, prompt_len:]  # (B, T_new)
        ttft = clock.times[0] - t0 if clock.times else None
        stats = list(self.handle.stats.images) if self.handle is not None else []
        results = []
        for i in range(new.shape[0]):
            ids = new[i].tolist()
            n = len(ids)
            for k, t in enumerate(ids):
                if t in self.eos_ids:
                    n = k + 1
                    break
            text = self.processor.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            if self.handle is None:
                n_img = int((inputs["input_ids"][i] == self.image_token_id).sum()) if self.image_token_id is not None else None
                n_before = n_kept = n_img
            elif len(stats) == new.shape[0]:
                n_before, n_kept = int(stats[i].n_before), int(stats[i].n_kept)
            else:
                rows = [s for s in stats if getattr(s, "sample", None) == i]
                n_before = sum(int(s.n_before) for s in rows) if rows else None
                n_kept = sum(int(s.n_kept) for s in rows) if rows else None
            tps = None
            if n > 1 and len(clock.times) >= n and clock.times[n - 1] > clock.times[0]:
                tps = (n - 1) / (clock.times[n - 1] - clock.times[0])
            results.append(GenOutput(text, n_before, n_kept, ttft, tps, peak, n))
        return results


def load_generator(spec: str | None, device: Any = None) -> Generator:
    """Build a backend. ``None``: the embedded default model (``vlmdrop.zoo.load_default``);
    ``py:module:factory``: ``factory()`` returns ``(model, processor)`` or a custom backend
    object (see :class:`Generator`); anything else: a
    Hugging Face model path or hub id (``AutoModelForImageTextToText`` + ``AutoProcessor``,
    sdpa attention, dtype from the checkpoint)."""
    if spec is None:
        from vlmdrop.zoo import load_default

        model, processor = load_default()
        return HFGenerator(model, processor, device)
    if spec.startswith("py:"):
        import importlib

        mod, _, attr = spec[3:].partition(":")
        obj = getattr(importlib.import_module(mod), attr)()
        if isinstance(obj, tuple) and len(obj) == 2:  # a (model, processor) factory
            return HFGenerator(obj[0], obj[1], device)
        return obj
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(spec)
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype="auto", attn_implementation="sdpa").eval()
    return HFGenerator(model, processor, device)


# ======================================================================================
# the sweep
# ======================================================================================
class _Dist:
    """Process rank / count through accelerate when launched with it, else a single process."""

    def __init__(self) -> None:
        self.rank, self.world, self.device, self._state = 0, 1, None, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ:
            import torch
            from accelerate import PartialState

            # without CUDA, processes started by `accelerate launch --multi_gpu` / torchrun use gloo on CPU
            self._state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world, self.device = self._state.process_index, self._state.num_processes, self._state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None and self.world > 1:
            self._state.wait_for_everyone()


def _data_dir_for(data: str | None, task: Task) -> str | None:
    """``--data`` is the task's folder, or a parent with one sub-folder per task name."""
    if data is None:
        return None
    sub = Path(data) / task.name
    return str(sub) if sub.is_dir() else data


def _check_run_meta(out: Path, cfg: EvalConfig, dist: _Dist) -> None:
    if not dist.main:  # the main process checks and writes; the others wait at the barrier
        return
    data = str(Path(cfg.data).resolve()) if cfg.data else None
    meta = {"model": cfg.model or "<default>", "data": data, "max_new_tokens": cfg.max_new_tokens,
            "method_args": cfg.method_args or {}}
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k, {} if k == "method_args" else None) != v}
        if diff:
            raise ValueError(f"{out} holds results of a different run ({diff}); choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=1))


def load_image(image: Any) -> Any:
    """A sample's image as an RGB PIL image; raises FileNotFoundError / OSError when unusable."""
    from PIL import Image

    if image is None:
        raise ValueError("sample has no image")
    if isinstance(image, dict):  # a `datasets` Image feature kept encoded: {"bytes", "path"}
        if image.get("bytes"):
            import io

            with Image.open(io.BytesIO(image["bytes"])) as im:
                return im.convert("RGB")
        image = image.get("path")
        if not image:
            raise ValueError("sample has no image")
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"missing image {image}")
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB")


def _base_row(item: Sample | BadRecord, method: str, budget: float) -> dict:
    return {"id": item.id, "method": method, "budget": budget}


def run_task_config(task: Task, items: Sequence[Sample | BadRecord], gen: Generator, method: str, budget: float,
                    out: Path, *, rank: int = 0, world: int = 1, batch_size: int = 1,
                    max_new_tokens: int | None = None, seed: int = 0, progress: bool = True,
                    before_first: Callable[[Sequence[Sample | BadRecord]], None] | None = None,
                    params: dict[str, Any] | None = None) -> int:
    """Run one (method, budget) on this process's shard of ``items``; returns the samples done now.

    Samples are assigned to process ``k % world``; those already in any part file are
    skipped, so a restarted run neither loses nor redoes a finished sample.
    """
    from tqdm.auto import tqdm

    task_dir = out / task.name
    done = {r["id"] for r in load_results(task_dir, method, budget)}
    todo = [s for k, s in enumerate(items) if k % world == rank and s.id not in done]
    if not todo:
        return 0
    if before_first is not None:
        before_first(items)
    writer = ResultWriter(task_dir / f"{config_key(method, budget)}.part{rank}.jsonl")
    if method == FULL:
        gen.configure(method, budget, seed)
    else:
        gen.configure(method, budget, seed, params or None)
    mnt = max_new_tokens or task.max_new_tokens
    scores: list[float] = []
    bar = tqdm(total=len(todo), desc=f"{task.name} {config_key(method, budget)}", disable=not progress, leave=False)
    n_done = 0
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            ok: list[Sample] = []
            images = []
            for s in batch:
                if isinstance(s, BadRecord):
                    writer.write({**_base_row(s, method, budget), "error": s.error})
                    continue
                try:
                    images.append(load_image(s.image))
                    ok.append(s)
                except Exception as e:
                    writer.write({**_base_row(s, method, budget), "error": f"image: {type(e).__name__}: {e}"})
            if ok:
                outs = gen.generate([s.prompt for s in ok], images, mnt)
                for s, o in zip(ok, outs):
                    score = task.score(s.target, s.meta, o.text)
                    if score is not None:
                        scores.append(score)
                    row = {**_base_row(s, method, budget), "answer": o.text, "score": score, "target": s.target,
                           "meta": s.meta, "n_before": o.n_before, "n_kept": o.n_kept, "ttft_s": o.ttft_s,
                           "decode_tps": o.decode_tps, "peak_mem_mb": o.peak_mem_mb,
                           "n_new_tokens": o.n_new_tokens, "batch_size": len(ok), "error": None}
                    writer.write(row)
            n_done += len(batch)
            bar.update(len(batch))
            if scores:
                bar.set_postfix(score=f"{100 * sum(scores) / len(scores):.1f}")
    finally:
        bar.close()
        writer.close()
    return n_done


def _warmup(gen: Generator, items: Sequence[Sample | BadRecord]) -> None:
    for s in items:
        if isinstance(s, Sample):
            try:
                img = load_image(s.image)
            except Exception:
                continue
            gen.configure(FULL, 1.0, 0)
            gen.generate([s.prompt], [img], 2)
            return


def _library_methods() -> list[str]:
    import vlmdrop

    return list(vlmdrop.methods())


def _check_methods(requested: Sequence[str], available: Sequence[str]) -> None:
    valid = [FULL] + list(available)
    bad = [m for m in requested if m not in valid]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; valid methods: {', '.join(valid)}")


def run_eval(cfg: EvalConfig, generator: Generator | None = None) -> dict[str, Path]:
    """Run the whole sweep and (on the main process) write the reports.

    Returns ``{task: report.md path}`` on the main process (empty on others).
    """
    from . import report

    dist = _Dist()
    tasks = [get_task(t) for t in cfg.tasks]
    configs = configurations(cfg.methods, cfg.budgets)
    if generator is None and not (cfg.model or "").startswith("py:"):
        _check_methods(cfg.methods, _library_methods())  # before a possibly long model load
    out = Path(cfg.out)
    _check_run_meta(out, cfg, dist)
    dist.barrier()
    loaded = {t.name: t.load(_data_dir_for(cfg.data, t), cfg.limit) for t in tasks}  # data errors first
    gen = generator if generator is not None else load_generator(cfg.model, dist.device)
    _check_methods(cfg.methods, gen.method_names())
    warm = [False]

    def warmup(items: Sequence[Sample | BadRecord]) -> None:
        if not warm[0]:
            _warmup(gen, items)
            warm[0] = True

    for t in tasks:
        items = loaded[t.name]
        for method, budget in configs:
            run_task_config(t, items, gen, method, budget, out, rank=dist.rank, world=dist.world,
                            batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                            progress=cfg.progress and dist.main, before_first=warmup,
                            params=cfg.method_args.get(method))
    if hasattr(gen, "close"):
        gen.close()
    dist.barrier()
    paths: dict[str, Path] = {}
    if dist.main and cfg.report:
        for t in tasks:
            paths[t.name] = report.write_report(t, out, configs, expected=[s.id for s in loaded[t.name]])
    return paths

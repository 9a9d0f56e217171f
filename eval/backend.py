"""Generation backends of a sweep: ``Generator`` (the protocol) and ``HFGenerator`` (a Hugging Face VLM,
dropping through the public ``vlmdrop`` API), with timing and memory.

Timing (documented in the README, *Outputs*): the inputs are on the device before the clock
starts, so image preprocessing and tokenisation are excluded. A ``LogitsProcessor`` stamps
the time (after a CUDA synchronise) every time ``generate`` hands it a step's logits.
TTFT = first stamp - start of ``generate``: vision tower, token dropping and LLM prefill.
Decode speed for a sample with n new tokens = (n - 1) / (stamp of its n-th step - first
stamp). With a batch, every sample of the batch shares the batch's TTFT.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each batch); on CPU the
process peak RSS (``VmHWM``), reset before each batch through ``/proc/self/clear_refs``
when the kernel allows it, else the lifetime peak (``ru_maxrss``).
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .loading import build_prompt, load_model
from .params import method_params, num_text_layers
from .results import FULL

log = logging.getLogger(__name__)

__all__ = ["GenOutput", "Generator", "HFGenerator", "load_generator"]


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
    """A model backend. ``configure`` switches the dropping method and returns what ``vlmdrop.apply``
    received (or None, see :func:`vlmdrop.eval.runner.configure`); ``generate`` answers a batch."""

    def method_names(self) -> list[str]: ...

    def configure(self, method: str, budget: float, seed: int,
                  params: dict[str, Any] | None = None) -> dict[str, Any] | None: ...

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
        self.num_layers = num_text_layers(model)

    def method_names(self) -> list[str]:
        import vlmdrop

        return list(vlmdrop.methods())

    def configure(self, method: str, budget: float, seed: int,
                  params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Apply ``method`` at ``budget`` (mapped by :func:`vlmdrop.eval.params.method_params` with this
        model's depth), or nothing for ``full``; returns what ``vlmdrop.apply`` received."""
        import vlmdrop

        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.method = FULL
        self._torch.manual_seed(seed)
        if method == FULL:
            return {}
        kw = method_params(method, budget, seed=seed, num_layers=self.num_layers, extra=params)
        self.handle = vlmdrop.apply(self.model, method, **kw)
        self.method = method
        return kw

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def build_prompt(self, question: str) -> str:
        """:func:`vlmdrop.eval.loading.build_prompt` with this backend's processor."""
        return build_prompt(self.processor, question)

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
                n_img = (int((inputs["input_ids"][i] == self.image_token_id).sum())
                         if self.image_token_id is not None else None)
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
    Hugging Face model path or hub id (:func:`vlmdrop.eval.loading.load_model`: sdpa attention,
    dtype from the checkpoint, InternVL's images-only processor fallback)."""
    if spec is None:
        return HFGenerator(*load_model(None, device=device), device)
    if spec.startswith("py:"):
        import importlib

        mod, _, attr = spec[3:].partition(":")
        obj = getattr(importlib.import_module(mod), attr)()
        if isinstance(obj, tuple) and len(obj) == 2:  # a (model, processor) factory
            return HFGenerator(obj[0], obj[1], device)
        return obj
    return HFGenerator(*load_model(spec, device=device), device)

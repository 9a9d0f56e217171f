"""The demo's model side (no Gradio): one model answers a question unmodified, then with a method applied.

Public API only: ``vlmdrop.apply`` / ``handle.stats`` / ``handle.remove``, the eval's model loader and prompt
builder (:mod:`vlmdrop.eval.loading`) and its budget -> parameter mapping (:mod:`vlmdrop.eval.params`, the one
``vlmdrop run`` and ``vlmdrop eval`` use; with a stack the budget goes to each method, as in ``vlmdrop run``).

``vlmdrop.apply`` changes the model in place, so a comparison (full answer, apply, reduced answer, ``handle.stats``,
remove) runs on a worker thread that holds a lock for all of it: two callers never interleave, the stats read are
the reduced call's own, and a caller that stops listening cannot keep the lock. Each answer streams from a
``TextIteratorStreamer`` fed by ``generate`` on its own thread; a ``LogitsProcessor`` stamps each step (after a
device synchronise) for the timings.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

__all__ = ["Answer", "DemoBackend", "method_choices"]


def method_choices() -> list[str]:
    """Every registered method, then every stack of a vision-stage and an LLM-stage method (``"hired+fastv"``)."""
    import vlmdrop
    from vlmdrop.registry import get_method

    names = vlmdrop.methods()
    vision = [m for m in names if get_method(m).config.stage != "llm"]
    llm = [m for m in names if get_method(m).config.stage == "llm"]
    return names + [f"{v}+{m}" for v in vision for m in llm]


@dataclass
class Answer:
    """One answer as it streams: the text so far and, once done, its timings and visual tokens."""

    text: str = ""
    done: bool = False
    ttft: float | None = None  # seconds from the start of generate to the first step's logits
    decode_tps: float | None = None  # new tokens after the first per second of decoding
    new_tokens: int = 0
    visual_tokens: int | None = None  # rows of visual tokens the LLM received (after the last drop)
    stats: Any = None  # the reduced model's ImageStats (None for the full model)
    method: str = ""
    config: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class _StepClock:
    """LogitsProcessor recording the time of every step's logits (after a device synchronise)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.sync()
        self.times.append(time.perf_counter())
        return scores


class DemoBackend:
    """A loaded model and processor, and the side-by-side comparison the demo runs on them."""

    def __init__(self, model: Any, processor: Any, *, max_new_tokens: int = 24) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    @classmethod
    def load(cls, name_or_path: str | None = None, *, dtype: str = "auto", device: str | None = None,
             attn_implementation: str = "sdpa", max_new_tokens: int = 24) -> DemoBackend:
        """The backend of ``vlmdrop.eval.loading.load_model`` (None: the embedded miniature LLaVA-NeXT)."""
        from vlmdrop.eval.loading import load_model

        model, processor = load_model(name_or_path, attn_implementation=attn_implementation, dtype=dtype,
                                      device=device)
        return cls(model, processor, max_new_tokens=max_new_tokens)

    def warm_up(self) -> None:
        """One untimed comparison (a grey picture, two new tokens, HiRED) so that the first user's timings do not
        include the process's first-call costs (kernel selection, allocator growth), as `vlmdrop run` warms up."""
        from PIL import Image

        t0 = time.perf_counter()
        for _ in self.compare(Image.new("RGB", (64, 48), (128, 128, 128)), "what is it?", "hired", 0.5,
                              max_new_tokens=2):
            pass
        log.info("warm-up comparison took %.2f s", time.perf_counter() - t0)

    # ----------------------------------------------------------------------------------
    def _inputs(self, image: Any, question: str) -> Any:
        from vlmdrop.eval.loading import build_prompt

        inputs = self.processor(images=image, text=build_prompt(self.processor, question), return_tensors="pt")
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def method_kwargs(self, method: str, budget: float) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """``(methods, {method: kwargs})`` for a choice of :func:`method_choices` and a budget; ValueError
        naming the choice or the budget."""
        from vlmdrop.eval.params import method_params, num_text_layers

        names = method.split("+")
        if method not in method_choices():
            raise ValueError(f"method {method!r} is not one of {', '.join(method_choices())}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
            raise ValueError(f"budget {budget!r} must be a fraction in (0, 1]")
        depth = num_text_layers(self.model)
        return names, {m: method_params(m, float(budget), seed=0, num_layers=depth) for m in names}

    def _stream(self, inputs: Any, max_new_tokens: int, answer: Answer) -> Iterator[Answer]:
        from transformers import LogitsProcessorList, TextIteratorStreamer

        dev = inputs["input_ids"].device
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        clock = _StepClock(sync)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600.0)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                                        streamer=streamer,
                                                        logits_processor=LogitsProcessorList([clock]))
            except BaseException as e:  # handed to the caller's thread below
                result["error"] = e
                streamer.end()

        sync()
        t0 = time.perf_counter()
        worker = threading.Thread(target=work, name="vlmdrop-demo-generate", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                answer.text += piece
                yield answer
        finally:  # also when the caller stops early: the model is not touched again before generate returns
            worker.join()
        if "error" in result:
            raise result["error"]
        answer.text = answer.text.strip()
        answer.new_tokens = int(result["out"].shape[1] - inputs["input_ids"].shape[1])
        if clock.times:
            answer.ttft = clock.times[0] - t0
            if len(clock.times) > 1:
                answer.decode_tps = (len(clock.times) - 1) / max(clock.times[-1] - clock.times[0], 1e-9)
        answer.done = True
        yield answer

    def compare(self, image: Any, question: str, method: str, budget: float, *,
                max_new_tokens: int | None = None) -> Iterator[tuple[Answer, Answer]]:
        """Stream ``(full, reduced)``: first the full model's answer, then the reduced model's (``method`` applied
        with ``budget``), each yielded as it grows (snapshots). The reduced answer carries ``handle.stats.images[0]``.

        The comparison runs on a worker thread that holds the lock; this generator only relays its snapshots, so a
        caller that stops iterating (a browser gone mid-answer, the generator never resumed nor closed) leaves no
        lock held and no handle applied once the worker finishes."""
        names, kwargs = self.method_kwargs(method, budget)  # a bad choice raises here, before any work
        n_new = int(max_new_tokens or self.max_new_tokens)
        updates: queue.Queue = queue.Queue()
        done = object()

        def work() -> None:
            try:
                for full, red in self._compare(image, question, method, names, kwargs, n_new):
                    updates.put((dataclasses.replace(full), dataclasses.replace(red)))
            except BaseException as e:  # handed to the caller's thread
                updates.put(e)
            finally:
                updates.put(done)

        threading.Thread(target=work, name="vlmdrop-demo-compare", daemon=True).start()
        while (item := updates.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _compare(self, image: Any, question: str, method: str, names: list[str],
                 kwargs: dict[str, dict[str, Any]], n_new: int) -> Iterator[tuple[Answer, Answer]]:
        import vlmdrop

        with self.lock:
            inputs = self._inputs(image, question)
            image_token = getattr(self.model.config, "image_token_id", None)
            n_visual = int((inputs["input_ids"] == image_token).sum()) if image_token is not None else None
            full, red = Answer(visual_tokens=n_visual, method="full"), Answer(method=method)
            for _ in self._stream(inputs, n_new, full):
                yield full, red
            handle = (vlmdrop.apply(self.model, names[0], **kwargs[names[0]]) if len(names) == 1
                      else vlmdrop.apply(self.model, names, **kwargs))
            try:
                configs = handle.config if isinstance(handle.config, tuple) else (handle.config,)
                red.config = "; ".join(repr(c) for c in configs)
                for _ in self._stream(inputs, n_new, red):
                    if red.done:
                        red.stats = handle.stats.images[0]
                        red.visual_tokens = red.stats.n_kept
                    yield full, red
            finally:
                handle.remove()

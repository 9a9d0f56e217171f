"""lmms-eval model plug-in: ``lmms-eval --model vlmdrop --model_args pretrained=PATH,method=hired,budget=0.2``.

Registered through the ``lmms_eval.models`` entry-point group (see ``pyproject.toml``); lmms-eval
>= 0.7 loads it from there. ``pretrained`` may be omitted for the embedded default model;
``method=full`` (default) runs the unmodified model; ``budget`` maps to the method's parameters exactly
as in ``vlmdrop eval`` (:func:`vlmdrop.eval.params.method_params`, with the loaded LM's depth); any other
``key=value`` of ``--model_args`` that is not listed below is passed to ``vlmdrop.apply`` as a method
parameter (numbers are converted), except the one ``budget`` sets (FastV's ``keep``, PyramidDrop's
``ratio``, the others' ``budget``) when ``budget`` is given: that is refused. Without ``budget`` the
method's own defaults apply.

Only ``generate_until`` is supported (every benchmark of ``vlmdrop.eval`` is a generation task);
``loglikelihood`` raises. Prompts are the task's ``doc_to_text`` wrapped in the processor's chat
template with one ``<image>`` per visual, exactly as ``vlmdrop eval`` does.
"""

from __future__ import annotations

import logging
from typing import Any

from .backend import load_generator
from .params import method_params
from .results import FULL

log = logging.getLogger(__name__)

try:  # lmms-eval is optional: the class is only defined where it is installed
    from lmms_eval.api.model import lmms as _LMMSBase
except Exception:  # pragma: no cover - exercised where lmms-eval is missing
    _LMMSBase = None


def _num(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def manifest():
    """Entry point payload for lmms-eval's model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlmdrop", simple_class_path="vlmdrop.eval.lmms_plugin.VlmdropLMMS")


if _LMMSBase is not None:

    class VlmdropLMMS(_LMMSBase):
        """A Hugging Face VLM with a vlmdrop method applied, as an lmms-eval model."""

        def __init__(self, pretrained: str | None = None, method: str = FULL, budget: float | None = None,
                     batch_size: int = 1, device: str | None = None, seed: int = 0, **extra: Any) -> None:
            super().__init__()
            import torch

            try:
                from accelerate import PartialState

                state = PartialState(cpu=not torch.cuda.is_available())
                self._rank, self._world_size = state.process_index, state.num_processes
                dev = torch.device(device) if device else state.device
            except Exception:
                self._rank, self._world_size = 0, 1
                dev = torch.device(device) if device else None
            self.method = method
            self.budget = None if budget in (None, "") else float(_num(budget))
            self.batch_size_per_gpu = int(batch_size)
            params = {k: _num(v) for k, v in extra.items()}
            if method == FULL and params:
                raise ValueError(f"method=full takes no method parameters, got {sorted(params)}")
            if method != FULL:  # a budget given twice (e.g. budget=0.2,keep=0.5) is refused before the model loads
                method_params(method, self.budget, seed=int(seed), extra=params)
            self.gen = load_generator(pretrained if pretrained not in (None, "", "default") else None, dev)
            #: what vlmdrop.apply received ({} for the full model)
            self.params = self.gen.configure(method, self.budget, int(seed), params) if method != FULL else {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        @property
        def batch_size(self) -> int:
            return self.batch_size_per_gpu

        def generate_until(self, requests) -> list[str]:
            from tqdm.auto import tqdm

            out = []
            for req in tqdm(requests, disable=self.rank != 0, desc="vlmdrop"):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.get("max_new_tokens", 1024))
                if not visuals:
                    raise ValueError(f"{task} doc {doc_id}: vlmdrop evaluates image questions only")
                (res,) = self.gen.generate([context], [visuals[0].convert("RGB")], max_new)
                text = res.text
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError("vlmdrop's lmms-eval model supports generate_until tasks only")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("vlmdrop's lmms-eval model supports single-round generate_until only")

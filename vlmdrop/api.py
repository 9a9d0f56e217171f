"""Public API: `apply`, `dropping`, `methods`, and the `DropHandle` they return."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from . import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from .interface import MethodConfig
from .registry import build_config, get_method, method_names
from .stats import DropStats

logger = logging.getLogger("vlmdrop")

_ATTR = "_vlmdrop_handle"


class DropHandle:
    """What `apply` put on a model.  `stats` describes the last prefill; `remove()` undoes everything.

    `stats` is written once per prefill, by the installed hooks when the forward returns (one object
    per prefill: a reference taken earlier keeps describing its own prefill); no stage reads it.
    Concurrent calls from several threads each publish their own prefill's stats, the last to return
    wins.
    """

    def __init__(self, model: nn.Module, method: str, config: MethodConfig | tuple[MethodConfig, ...]) -> None:
        self.model = model
        self.method = method
        self.config = config
        self._stats = DropStats()
        self._installation: Any = None

    @property
    def stats(self) -> DropStats:
        """Per-image statistics of the last prefill."""
        return self._stats

    @stats.setter
    def stats(self, stats: DropStats) -> None:
        if not isinstance(stats, DropStats):
            raise TypeError(f"handle.stats must be a DropStats, got {type(stats).__name__}")
        self._stats = stats

    @property
    def active(self) -> bool:
        return self._installation is not None

    def remove(self) -> None:
        """Remove every hook and restore the model exactly; calling it again does nothing."""
        if self._installation is None:
            return
        self._installation.remove()
        self._installation = None
        if self.model.__dict__.get(_ATTR) is self:
            del self.model.__dict__[_ATTR]

    def __enter__(self) -> DropHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"DropHandle({self.method}, {self.config}, {state})"


def methods() -> list[str]:
    """Names of the registered methods."""
    return method_names()


def _resolve(method: str | Sequence[str], params: dict[str, Any]) -> list[tuple[str, MethodConfig]]:
    """(name, validated config) per method: one name with its parameters, or a list of names (at most
    one vision-stage and one LLM-stage method) with each method's parameters under its name."""
    if isinstance(method, str):
        get_method(method)
        return [(method, build_config(method, params))]
    if (not isinstance(method, (list, tuple)) or not 1 <= len(method) <= 2
            or not all(isinstance(m, str) for m in method)):
        raise ValueError(f"method={method!r}: give a method name, or a list of one vision-stage and one LLM-stage "
                         f"method name, e.g. ['hired', 'fastv']; valid methods: {', '.join(method_names())}")
    for name in method:
        get_method(name)
    if len(set(method)) != len(method):
        raise ValueError(f"method={list(method)!r} names a method twice")
    unknown = sorted(set(params) - set(method))
    if unknown:
        raise ValueError(f"with a list of methods, pass each method's parameters as a dict under its name "
                         f"(e.g. {method[0]}={{...}}); got unexpected keyword(s) {unknown}")
    out = []
    for name in method:
        p = params.get(name, {})
        if not isinstance(p, dict):
            raise ValueError(f"{name}={p!r}: the parameters of {name!r} must be a dict")
        out.append((name, build_config(name, p)))
    stages = [cfg.stage for _, cfg in out]
    if len(out) == 2 and sorted(stages) != ["llm", "vision"]:
        raise ValueError(f"method={list(method)!r} are all {stages[0]}-stage methods; stack one vision-stage "
                         "method with one LLM-stage method")
    return sorted(out, key=lambda nc: nc[1].stage != "vision")  # vision stage first


def apply(model: nn.Module, method: str | Sequence[str], **params: Any) -> DropHandle:
    """Make `model` drop visual tokens with `method`, in place; returns a `DropHandle`.

    Args:
        model: a supported Hugging Face VLM (see `vlmdrop.adapters.supported_classes()`).
        method: a name from `vlmdrop.methods()`, or a list stacking one vision-stage and one LLM-stage
            method, e.g. `["hired", "fastv"]`.
        **params: the method's parameters (its config dataclass fields), e.g. `budget=0.2`; with a list,
            one dict per method under its name, e.g. `hired={"budget": 0.4}, fastv={"keep": 0.5}`; plus
            the adapter's own options where it has any (open_clip towers: `layer`).

    Raises:
        ValueError: unknown method or parameter, invalid value, unsupported model, or a model that
            already has a method applied.
    """
    from vlmdrop.adapters import adapter_for

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapter = adapter_for(model)
    # adapter-level knobs (e.g. open_clip's `layer`) are not method parameters
    options = {k: params.pop(k) for k in adapter.options if k in params}
    resolved = _resolve(method, params)
    existing = model.__dict__.get(_ATTR)
    if existing is not None and existing.active:
        raise ValueError(f"{type(model).__name__} already has vlmdrop method {existing.method!r} applied; "
                         "call handle.remove() first")
    if any(cfg.stage == "llm" for _, cfg in resolved) and not adapter.supports_llm_stage:
        raise ValueError(f"the {type(model).__name__} adapter does not support LLM-stage methods")
    name = "+".join(n for n, _ in resolved)
    config = resolved[0][1] if len(resolved) == 1 else tuple(cfg for _, cfg in resolved)
    handle = DropHandle(model, name, config)
    runners = {cfg.stage: get_method(n).method(cfg) for n, cfg in resolved}
    handle._installation = adapter.install(runners.get("vision"), runners.get("llm"), handle, **options)
    model.__dict__[_ATTR] = handle
    logger.debug("applied %s to %s", config, type(model).__name__)
    return handle


@contextlib.contextmanager
def dropping(model: nn.Module, method: str | Sequence[str], **params: Any) -> Iterator[DropHandle]:
    """Context manager form of `apply`: the method is removed on exit, also on exceptions."""
    handle = apply(model, method, **params)
    try:
        yield handle
    finally:
        handle.remove()

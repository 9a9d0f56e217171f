"""Public API: `apply`, `dropping`, `methods`, and the `DropHandle` they return."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

from . import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from .interface import MethodConfig
from .registry import build_config, get_method, method_names
from .stats import DropStats

logger = logging.getLogger("vlmdrop")

_ATTR = "_vlmdrop_handle"


class DropHandle:
    """What `apply` put on a model.  `stats` describes the last prefill; `remove()` undoes everything."""

    def __init__(self, model: nn.Module, method: str, config: MethodConfig) -> None:
        self.model = model
        self.method = method
        self.config = config
        self.stats = DropStats()
        self._install: Any = None

    def _set_stats(self, stats: DropStats) -> None:
        self.stats = stats

    @property
    def active(self) -> bool:
        return self._install is not None

    def remove(self) -> None:
        """Remove every hook and restore the model exactly; calling it again does nothing."""
        if self._install is None:
            return
        self._install.remove()
        self._install = None
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


def apply(model: nn.Module, method: str, **params: Any) -> DropHandle:
    """Make `model` drop visual tokens with `method`, in place; returns a `DropHandle`.

    Args:
        model: a supported Hugging Face VLM (see `vlmdrop.adapters.supported_classes()`).
        method: a name from `vlmdrop.methods()`.
        **params: the method's parameters (its config dataclass fields), e.g. `budget=0.2`, plus the
            adapter's own options where it has any (open_clip towers: `layer`).

    Raises:
        ValueError: unknown method or parameter, invalid value, unsupported model, or a model that
            already has a method applied.
    """
    from vlmdrop.adapters import adapter_for

    reg = get_method(method)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapter = adapter_for(model)
    # adapter-level knobs (e.g. open_clip's `layer`) are not method parameters
    options = {k: params.pop(k) for k in getattr(adapter, "options", ()) if k in params}
    config = build_config(method, params)
    existing = model.__dict__.get(_ATTR)
    if existing is not None and existing.active:
        raise ValueError(f"{type(model).__name__} already has vlmdrop method {existing.method!r} applied; "
                         "call handle.remove() first")
    handle = DropHandle(model, method, config)
    handle._install = adapter.install(reg.method(config), handle, **options)
    model.__dict__[_ATTR] = handle
    logger.debug("applied %s to %s", config, type(model).__name__)
    return handle


@contextlib.contextmanager
def dropping(model: nn.Module, method: str, **params: Any) -> Iterator[DropHandle]:
    """Context manager form of `apply`: the method is removed on exit, also on exceptions."""
    handle = apply(model, method, **params)
    try:
        yield handle
    finally:
        handle.remove()

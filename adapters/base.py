"""Adapter interface and registry: where, in a given architecture, scores are taken and tokens removed."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_ADAPTERS: list[tuple[tuple[str, ...], Callable[[nn.Module], "Adapter"]]] = []


class Adapter:
    """Owns every transformers detail of one model family.  Subclasses implement `install`."""

    #: names of the model classes this adapter supports (for error messages)
    supported: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.supported

    def install(self, method, handle) -> list:  # pragma: no cover - interface
        """Install hooks running `method`; return objects with a `remove()` method."""
        raise NotImplementedError


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS.append((cls.supported, cls))
    return cls


def supported_classes() -> list[str]:
    return sorted(name for names, _ in _ADAPTERS for name in names)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`'s class, or a ValueError naming the supported classes."""
    for _, cls in _ADAPTERS:
        if cls.accepts(model):
            return cls(model)
    raise ValueError(
        f"vlmdrop has no adapter for {type(model).__name__}; supported model classes: {', '.join(supported_classes())}"
    )

"""Method registry: a name maps to a frozen config dataclass and the class that runs it."""

from __future__ import annotations

from collections.abc import Callable

from .interface import MethodConfig, VisionMethod, _Registered

_METHODS: dict[str, _Registered] = {}


def register_method(name: str, config: type[MethodConfig]) -> Callable[[type[VisionMethod]], type[VisionMethod]]:
    """Class decorator: `@register_method("hired", HiredConfig)` on the method class."""

    def deco(cls: type[VisionMethod]) -> type[VisionMethod]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        config.name = name
        _METHODS[name] = _Registered(config=config, method=cls, doc=(cls.__doc__ or "").strip())
        return cls

    return deco


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> _Registered:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")
    return _METHODS[name]


def build_config(name: str, params: dict) -> MethodConfig:
    """Construct and validate `name`'s config; unknown parameters raise ValueError naming them."""
    reg = get_method(name)
    valid = reg.config.fields()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for method {name!r}; valid parameters: {', '.join(valid)}")
    try:
        return reg.config(**params)
    except TypeError as e:  # e.g. a required field missing
        raise ValueError(f"bad parameters for method {name!r}: {e}; valid parameters: {', '.join(valid)}") from e

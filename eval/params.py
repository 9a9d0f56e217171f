"""One budget -> parameter mapping for every caller: ``vlmdrop run``, ``vlmdrop eval``,
``python -m vlmdrop.zoo.evaluate`` and the lmms-eval plug-in.

Each method's config owns its rule: ``budget_field`` names the parameter a budget sets (``budget``
for the vision-stage methods, FastV's ``keep``, PyramidDrop's ``ratio``); the LLM-stage configs also
say how a budget maps to it (``budget_params``: PyramidDrop's budget is the share left after its
last stage, so each of its n boundaries keeps ``budget ** (1 / n)``) and which parameters follow
the language model's depth when the caller gives none (``depth_defaults``: PyramidDrop's stages
8/16/24 of 32 layers scaled to the LM, FastV's layer 2 moved into the LM's first third).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

log = logging.getLogger(__name__)

__all__ = ["budget_field", "depth_defaults", "method_params", "num_text_layers"]


def _config(method: str) -> Any:
    from vlmdrop.registry import get_method  # raises ValueError listing the valid names

    return get_method(method).config


def budget_field(method: str) -> str:
    """The parameter of ``method`` that a budget sets (``budget``, FastV's ``keep``, PyramidDrop's ``ratio``)."""
    return _config(method).budget_field


def depth_defaults(method: str, num_layers: int) -> dict[str, Any]:
    """Parameters ``method`` takes from the language model's depth when the caller gives none ({} for the
    vision-stage methods, and where the rule gives the method's own default)."""
    cfg = _config(method)
    return dict(cfg.depth_defaults(num_layers)) if cfg.stage == "llm" else {}


def num_text_layers(model: Any) -> int | None:
    """Decoder layers of a VLM's language model (``config.get_text_config().num_hidden_layers``), or None."""
    try:
        return int(model.config.get_text_config().num_hidden_layers)
    except (AttributeError, TypeError, ValueError):
        return None


def method_params(method: str, budget: float | None = None, *, seed: int = 0, num_layers: int | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vlmdrop.apply(model, method, **kw)``.

    ``budget`` (a fraction in (0, 1], or a token count > 1, passed as an int) goes to the method's budget
    parameter through its config's rule; ``random`` also gets ``seed``; then ``extra`` (the caller's other
    parameters); then, when ``num_layers`` (the loaded LM's depth) is given, the depth defaults for what
    ``extra`` does not set. ``extra`` may not set the budget parameter when a budget is given (the result
    would be labelled with one budget while another ran): ValueError naming both.
    """
    cfg = _config(method)
    extra = dict(extra or {})
    field = cfg.budget_field
    kw: dict[str, Any] = {}
    if budget is not None:
        if field in extra:
            raise ValueError(f"{method}: {field}={extra[field]!r} is given as well as budget={budget:g}, which sets "
                             f"{method}'s {field!r}; give one of them")
        b = int(budget) if budget > 1 else budget
        if cfg.stage == "llm":
            depth = {} if num_layers is None else cfg.depth_defaults(num_layers)
            layered = {**extra, **{k: v for k, v in depth.items() if k not in extra}}
            kw.update(cfg.budget_params(b, layered))
        else:
            kw[field] = b
    if method == "random" and "seed" not in extra:
        kw["seed"] = seed
    kw.update(extra)
    if num_layers is not None and cfg.stage == "llm":
        kw.update({k: v for k, v in cfg.depth_defaults(num_layers).items() if k not in extra})
    return kw

"""``vlmdrop.demo``: the Gradio side-by-side demo (``vlmdrop demo``; needs the ``demo`` extra for the page).

:mod:`.layout` (pure: where each visual position looks, the kept-token picture, bar charts), :mod:`.samples`
(built-in pictures, checked uploads), :mod:`.backend` (the model side: full and reduced answers, streamed),
:mod:`.app` (the Gradio page). Only the public API is used: ``vlmdrop.apply``, ``handle.stats``, the eval's
model loader and prompt builder.
"""

from __future__ import annotations

from typing import Any

__all__ = ["launch"]


def launch(**kwargs: Any) -> Any:
    """:func:`vlmdrop.demo.app.launch` (imports Gradio only when called; ImportError naming it when missing)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ImportError("vlmdrop demo needs gradio, which is not installed: pip install 'vlmdrop[demo]'",
                          name="gradio")
    from .app import launch as _launch

    return _launch(**kwargs)

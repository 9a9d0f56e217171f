"""Built-in methods; importing this package registers them."""

from . import fastv, hired, pdrop, random  # noqa: F401

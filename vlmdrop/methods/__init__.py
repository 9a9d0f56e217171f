"""Built-in methods; importing this package registers them."""

from . import fastv, globalcom2, hired, pdrop, random  # noqa: F401

"""Built-in methods; importing this package registers them."""

from . import fastv, globalcom2, hired, pdrop, pool, random, visionzip  # noqa: F401

"""Module layout: eval/ has no import circle (report uses the result store, not the driver), the test models
live in vlmdrop.testing and vlmdrop.zoo.tiny is a deprecated re-export of them."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, absent", [
    ("vlmdrop.eval.report", ["vlmdrop.eval.runner", "vlmdrop.eval.backend"]),
    ("vlmdrop.eval.results", ["vlmdrop.eval.runner", "vlmdrop.eval.report", "vlmdrop.eval.backend"]),
    ("vlmdrop.eval.backend", ["vlmdrop.eval.runner", "vlmdrop.eval.report"]),
    ("vlmdrop.testing", ["vlmdrop.zoo"]),
])
def test_module_imports_alone_without_the_layers_above(module, absent):
    code = (f"import sys, {module}; bad = [m for m in {absent!r} if m in sys.modules]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_zoo_tiny_is_a_deprecated_reexport_of_vlmdrop_testing():
    import importlib

    import vlmdrop.testing as testing

    sys.modules.pop("vlmdrop.zoo.tiny", None)
    with pytest.warns(DeprecationWarning, match="vlmdrop.testing"):
        tiny = importlib.import_module("vlmdrop.zoo.tiny")
    assert tiny.tiny_llava is testing.tiny_llava and tiny.tiny_internvl is testing.tiny_internvl

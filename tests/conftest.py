"""Make ``vlmdrop`` (and its mapped ``vlmdrop.adapters`` / ``vlmdrop.eval``) import from *this*
checkout even when the environment's editable install points at another checkout (several
git worktrees share one virtualenv). Does nothing when the install already points here.
Subprocesses started by the tests get the same mapping through ``PYTHONPATH`` + a generated
``sitecustomize.py``."""

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_FINDER = '''
import importlib.util, sys
_MAP = {"vlmdrop": %(root)r + "/vlmdrop", "vlmdrop.adapters": %(root)r + "/adapters", "vlmdrop.eval": %(root)r + "/eval"}
class _CheckoutFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in _MAP:
            return importlib.util.spec_from_file_location(
                name, _MAP[name] + "/__init__.py", submodule_search_locations=[_MAP[name]])
        return None
sys.meta_path.insert(0, _CheckoutFinder)
'''


def _installed_here() -> bool:
    for name in ("vlmdrop", "vlmdrop.eval"):
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            return False
        if spec is None or spec.origin is None or not Path(spec.origin).resolve().is_relative_to(ROOT):
            return False
    return True


if not _installed_here():
    code = _FINDER % {"root": str(ROOT)}
    exec(compile(code, "<vlmdrop-checkout-finder>", "exec"), {})
    shim = Path(tempfile.mkdtemp(prefix="vlmdrop-shim-"))
    (shim / "sitecustomize.py").write_text(code)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(shim)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    for mod in [m for m in sys.modules if m == "vlmdrop" or m.startswith("vlmdrop.")]:
        del sys.modules[mod]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

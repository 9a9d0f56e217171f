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

# ---- shared fixtures
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
from PIL import Image

from vlmdrop.zoo.tiny import tiny_internvl, tiny_llava, tiny_llava_next

torch.set_num_threads(2)

# (H, W) image sizes giving LLaVA-NeXT grids 1x3, 2x1, 2x2, 1x3, 3x1, 1x2 (tiny model: crops of 56 px, 4x4 patches)
IMAGE_SIZES = [(60, 130), (90, 50), (120, 110), (40, 170), (160, 45), (56, 56)]


def make_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))


MIXED_SIZES = [(60, 130), (90, 50), (56, 56)]

PROMPTS = ["USER: <image>\nwhat is the shape ? ASSISTANT:", "USER: <image>\nwhat color is this ? ASSISTANT:",
           "USER: <image>\nis there a red circle in the picture ? ASSISTANT:"]

_CACHE: dict = {}


def get_model(kind: str, attn: str = "sdpa"):
    key = (kind, attn)
    if key not in _CACHE:
        build = {"llava": tiny_llava, "llava_next": tiny_llava_next, "internvl": tiny_internvl}[kind]
        _CACHE[key] = build(attn_implementation=attn)
    return _CACHE[key]


@pytest.fixture(params=["llava", "llava_next"])
def kind(request):
    return request.param


def batch(processor, sizes, prompts=None, seed=0):
    images = [make_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(sizes))]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)

"""The lmms-eval plug-in's model class maps `budget` with vlmdrop.eval.params, as `vlmdrop eval` does.

lmms-eval itself is optional (tests/test_eval_lmms.py runs its real CLI where it is installed): here its
base class is stood in for by a minimal module, so that the class is defined and its arguments checked
everywhere."""

import importlib
import sys
import types

import pytest


@pytest.fixture
def plugin(monkeypatch):
    if "lmms_eval" not in sys.modules:
        try:
            import lmms_eval.api.model  # noqa: F401
        except ImportError:
            api = types.ModuleType("lmms_eval.api")
            model = types.ModuleType("lmms_eval.api.model")

            class lmms:  # the attributes VlmdropLMMS uses
                def __init__(self) -> None:
                    pass

            model.lmms = lmms
            api.model = model
            root = types.ModuleType("lmms_eval")
            root.api = api
            for name, mod in (("lmms_eval", root), ("lmms_eval.api", api), ("lmms_eval.api.model", model)):
                monkeypatch.setitem(sys.modules, name, mod)
    import vlmdrop.eval.lmms_plugin as mod

    mod = importlib.reload(mod)
    yield mod
    monkeypatch.undo()
    importlib.reload(mod)


@pytest.mark.parametrize("extra", [{"keep": "0.5"}, {"layer": "1", "keep": "3"}])
def test_budget_and_the_parameter_it_sets_are_refused(plugin, extra, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(plugin, "load_generator", no_load)
    with pytest.raises(ValueError, match=r"keep=.*budget=0.2"):
        plugin.VlmdropLMMS(method="fastv", budget="0.2", **extra)


def test_keep_without_budget_is_the_method_parameter(plugin):
    m = plugin.VlmdropLMMS(method="fastv", keep="0.5")
    assert m.params == {"keep": 0.5, "layer": 1}  # the embedded 5-layer LM: the depth default too
    assert m.gen.handle.config.keep == 0.5 and m.gen.handle.config.layer == 1


def test_budget_maps_as_vlmdrop_eval_on_the_embedded_model(plugin):
    from vlmdrop.eval.params import method_params

    m = plugin.VlmdropLMMS(method="pdrop", budget="0.1")
    assert m.params == {"ratio": 0.1 ** (1 / 3), "layers": [1, 3, 4]} == method_params("pdrop", 0.1, num_layers=5)
    assert m.gen.handle.config.layers == (1, 3, 4)
    m.gen.close()

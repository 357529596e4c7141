"""Registries: one broken module leaves the others usable and is named where it matters (a lookup
of an unknown name, `fusionbench list`); a name registered twice names both modules; the shipped
registries import every one of their modules."""
from __future__ import annotations

import sys

import pytest

from fusionbench.cli import main
from fusionbench.errors import FusionBenchError


@pytest.fixture
def package(tmp_path, monkeypatch):
    pkg = tmp_path / "fb_plugins_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from fusionbench.registry import Registry\nREG = Registry('thing', __name__)\n")
    (pkg / "good.py").write_text("from fb_plugins_probe import REG\n@REG.register('good')\nclass Good:\n    pass\n")
    (pkg / "zz_broken.py").write_text("import no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("fb_plugins_probe")]:
        del sys.modules[name]


def test_a_broken_module_leaves_the_others_usable_and_is_named_on_lookup(package):
    from fb_plugins_probe import REG

    assert REG.get("good").__name__ == "Good" and REG.names() == ["good"]
    assert REG.broken == {"fb_plugins_probe.zz_broken": "ModuleNotFoundError: No module named 'no_such_module_here'"}
    with pytest.raises(FusionBenchError, match=r"unknown thing 'goood'\. Did you mean 'good'\?.*"
                                               r"fb_plugins_probe\.zz_broken failed to import \(ModuleNotFoundError"):
        REG.get("goood")


def test_a_name_registered_twice_names_both_modules(package):
    (package / "twin.py").write_text("from fb_plugins_probe import REG\n@REG.register('good')\nclass Other:\n    pass\n")
    from fb_plugins_probe import REG

    with pytest.raises(FusionBenchError, match=r"thing 'good' is registered twice: in fb_plugins_probe\.good and in "
                                               r"fb_plugins_probe\.twin"):
        REG.get("good")


def test_the_shipped_registries_import_every_module(capsys):
    from fusionbench.data import DATASETS
    from fusionbench.evaluation import EVALUATORS
    from fusionbench.fusion import FUSIONS

    for reg in (FUSIONS, DATASETS, EVALUATORS):
        reg.names()
        assert reg.broken == {}, reg.broken
    assert main(["list"]) == 0
    out = capsys.readouterr()
    assert "mlp" in out.out and "visual_expert" in out.out and "warning" not in out.err


@pytest.mark.parametrize("options, hint", [
    ("class Options:\n    hidden_size = 4\n", "Options must be a @dataclass subclass of FusionOptions"),
    ("class Options(FusionOptions):\n    hidden_size: int = 4\n", "a subclass without its own @dataclass"),
])
def test_a_strategy_whose_options_are_not_a_dataclass_is_reported_broken_not_run(package, options, hint):
    """Found when the registry loads (``fusionbench list``, any lookup), not mid-training."""
    (package / "strat.py").write_text(
        "from fusionbench.fusion.base import FusionOptions, FusionStrategy, register\n"
        "@register('probe_strategy')\nclass Probe(FusionStrategy):\n"
        + "".join("    " + line + "\n" for line in options.splitlines()))
    import importlib

    with pytest.raises(TypeError, match=hint):
        importlib.import_module("fb_plugins_probe.strat")
    from fusionbench.fusion import FUSIONS

    assert "probe_strategy" not in FUSIONS._items

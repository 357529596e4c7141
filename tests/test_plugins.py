"""Plugins: a strategy defined outside the package (a .py file or a module named in the config's
``plugins``, or an installed package's ``fusionbench.plugins`` entry point) runs through the same
path as a shipped one, and its source is in the row's provenance and code_hash."""
from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest

from fusionbench import plugins
from fusionbench.cli import main
from fusionbench.config import load_config
from fusionbench.errors import FusionBenchError
from fusionbench.fusion import FUSIONS
from fusionbench.results import _package_hash, code_hash, read_results
from tests.helpers import TINY

PLUGIN = '''
from torch import nn

from fusionbench.fusion.base import register
from fusionbench.fusion.projector import LinearProjector


@register("probe_tanh_linear")
class TanhLinear(LinearProjector):
    """A linear projector squashed by tanh: a new variant in one file outside the package."""
    TEXT_PATH = "frozen"

    def build_projector(self):
        return nn.Sequential(nn.Linear(self.vision_dim, self.lm_hidden_size), nn.Tanh())
'''


@pytest.fixture
def clean_plugins(monkeypatch):
    """The process's registries and plugin record as they were, whatever the test imported."""
    FUSIONS.names()  # loaded first, so the snapshot holds every shipped strategy
    items, loaded = dict(FUSIONS._items), dict(plugins.LOADED)
    yield
    FUSIONS._items.clear()
    FUSIONS._items.update(items)
    plugins.LOADED.clear()
    plugins.LOADED.update(loaded)
    for name in [m for m in sys.modules if m.startswith(("fusionbench_plugin_", "fb_ep_probe"))]:
        del sys.modules[name]


def test_a_strategy_in_a_file_outside_the_package_trains_and_is_recorded(tmp_path, monkeypatch, clean_plugins):
    plugin = tmp_path / "my_fusion.py"
    plugin.write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FusionBenchError, match="unknown fusion strategy 'probe_tanh_linear'"):
        load_config(TINY, ["fusion=probe_tanh_linear"])  # without the plugin it does not exist
    assert main(["run", str(TINY), "plugins=[my_fusion.py]", "fusion=probe_tanh_linear", "trainer.max_steps=2",
                 f"output_dir={tmp_path / 'runs'}", f"results_file={tmp_path / 'res.jsonl'}"]) == 0
    row = read_results(tmp_path / "res.jsonl").iloc[0]
    assert row.strategy == "probe_tanh_linear" and row["mm/choice/acc"] == row["mm/choice/acc"]  # a real score
    assert list(row.plugins) == ["my_fusion.py"] and len(row.plugins["my_fusion.py"]) == 12
    assert row.code_hash == code_hash() != _package_hash()  # the plugin's source counts in the code
    assert main(["list", "--plugin", "my_fusion.py"]) == 0


@pytest.mark.parametrize("spec, message", [
    ("nowhere/missing.py", "plugins[0]: no such file: nowhere/missing.py"),
    ("no_such_plugin_module", "plugins[0] 'no_such_plugin_module' failed to import: no module named 'no_such_plugin_module'"),
    ("broken.py", "plugins[0] 'broken.py' failed to import: ZeroDivisionError: division by zero"),
])
def test_a_plugin_that_cannot_load_is_one_clear_error(tmp_path, monkeypatch, clean_plugins, spec, message):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FusionBenchError) as err:
        load_config(TINY, [f"plugins=[{spec}]"])
    assert message in str(err.value)


def test_an_installed_entry_point_registers_and_a_broken_one_is_reported(tmp_path, monkeypatch, clean_plugins):
    (tmp_path / "fb_ep_probe.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [importlib.metadata.EntryPoint("lab", "fb_ep_probe", plugins.ENTRY_POINT_GROUP),
           importlib.metadata.EntryPoint("oops", "fb_ep_probe_missing", plugins.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [e for e in eps if e.group == group])
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    monkeypatch.setattr(plugins, "BROKEN", {})
    from fusionbench.registry import Registry

    reg = Registry("fusion strategy", "fusionbench.fusion")  # a registry loading for the first time
    reg.names()
    assert "probe_tanh_linear" in FUSIONS._items  # registered through the shipped decorator
    assert "entry point lab (fb_ep_probe)" in plugins.LOADED
    assert list(reg.broken) == ["plugin oops (fb_ep_probe_missing)"]
    assert "ModuleNotFoundError" in reg.broken["plugin oops (fb_ep_probe_missing)"]


def test_a_plugin_packages_helper_modules_count_in_its_hash(tmp_path, monkeypatch, clean_plugins):
    """An edit to a module the plugin imports from its own package changes the plugin's hash (and
    so code_hash); a second spelling of the same file is not imported twice."""
    pkg = tmp_path / "fb_ep_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import helper\n")
    (pkg / "helper.py").write_text("WIDTH = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_IMPORTED", set())

    def load() -> str:
        for name in [m for m in sys.modules if m.startswith("fb_ep_probe_pkg")]:
            del sys.modules[name]
        plugins._IMPORTED.clear()
        plugins.LOADED.pop("fb_ep_probe_pkg", None)
        plugins.load_plugins(["fb_ep_probe_pkg"])
        return plugins.LOADED["fb_ep_probe_pkg"]

    first = load()
    assert load() == first  # the same source: the same hash
    (pkg / "helper.py").write_text("WIDTH = 2\n")
    import importlib

    importlib.invalidate_caches()
    assert load() != first
    (tmp_path / "single.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    plugins.load_plugins(["single.py", "./single.py"])
    assert "single.py" in plugins.LOADED and "./single.py" not in plugins.LOADED

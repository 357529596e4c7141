"""Members of archives the package registry no longer serves ship with fusionbench
(``fusionbench/assets/vendored``): ``bigbench==1.0.0`` left PyPI on 2026-12-04. Every BIG-bench task a
config, the text suite or the task selection names loads with no registry at all, byte for byte as
the sdist had it; a task not shipped fails with one message naming those that are."""
import gzip
import hashlib
import json
import shutil

import pytest
from omegaconf import OmegaConf

from fusionbench.assets import pypi
from fusionbench.errors import AssetUnavailable
from tests.helpers import ROOT


@pytest.fixture
def no_registry(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the registry was asked")
    monkeypatch.setattr(pypi, "download", refuse)
    monkeypatch.setattr(pypi.urllib.request, "urlopen", refuse)
    monkeypatch.setattr(pypi.subprocess, "run", refuse)


def _named_tasks() -> set[str]:
    """Every BIG-bench task the project names: the text suite's defaults and known tasks, every
    experiment's eval.text.tasks / gen_tasks, and the task selection's candidates."""
    from fusionbench.config import TextEvalConfig
    from fusionbench.evaluation.task_selection import CANDIDATES, GEN_CANDIDATES
    from fusionbench.evaluation.text_suite import KNOWN_TASKS

    names = {*TextEvalConfig().tasks, *TextEvalConfig().gen_tasks, *KNOWN_TASKS, *CANDIDATES, *GEN_CANDIDATES}
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        text = OmegaConf.to_container(OmegaConf.load(path)).get("eval", {}).get("text", {}) or {}
        names |= {*text.get("tasks", []), *text.get("gen_tasks", [])}
    return {n.split(":")[0] for n in names}


def _shipped() -> set[str]:
    from fusionbench.evaluation.text_suite import shipped_tasks

    return set(shipped_tasks())


def test_every_task_the_project_names_is_shipped():
    named = _named_tasks()
    assert {"general_knowledge", "qa_wikidata", "movie_recommendation", "hyperbaton"} <= named  # the scan works
    assert named <= _shipped(), sorted(named - _shipped())


def test_shipped_tasks_load_without_a_registry_byte_for_byte(no_registry):
    from fusionbench.evaluation.text_suite import BIGBENCH, _bigbench_json, task_glob

    tasks = sorted(_shipped())
    loaded = _bigbench_json(tasks)
    assert set(loaded) == set(tasks) and all(loaded[t]["examples"] for t in tasks)
    members = pypi.vendored_members(BIGBENCH)
    paths = pypi.pypi_files(BIGBENCH, [task_glob(t) for t in tasks], sdist=True)  # from the markers now
    for glob, path in paths.items():
        name = str(path).split("bigbench_files/", 1)[1]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == members[name]  # where the sdist puts it
    assert loaded["general_knowledge"]["name"] == "general_knowledge"


def test_a_task_not_shipped_names_the_shipped_ones(monkeypatch):
    from fusionbench.evaluation.text_suite import _bigbench_json

    monkeypatch.setattr(pypi, "download", lambda *a, **kw: (_ for _ in ()).throw(
        AssetUnavailable("https://pypi.org/simple/bigbench/ lists no sdist for 'bigbench==1.0.0'.")))
    with pytest.raises(AssetUnavailable, match=r"BIG-bench task\(s\) anachronisms: .*lists no sdist.*"
                                               r"only the tasks it ships .*general_knowledge"):
        _bigbench_json(["general_knowledge", "anachronisms"])


def test_a_shipped_file_that_differs_from_its_manifest_is_refused(tmp_path, monkeypatch, no_registry):
    root = tmp_path / "vendored"
    shutil.copytree(pypi.VENDORED, root)
    monkeypatch.setattr(pypi, "VENDORED", root)
    name = "bigbench-1.0.0/bigbench/benchmark_tasks/general_knowledge/task.json"
    gz = root / "bigbench-1.0.0" / (name.split("/", 1)[1] + ".gz")
    data = json.loads(gzip.decompress(gz.read_bytes()))
    data["examples"] = data["examples"][:1]
    gz.write_bytes(gzip.compress(json.dumps(data).encode()))
    with pytest.raises(AssetUnavailable, match="sha256 differs"):
        pypi.pypi_files("bigbench==1.0.0", ["*/benchmark_tasks/general_knowledge/task.json"], sdist=True)

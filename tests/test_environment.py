"""The locked environment: the lock covers what pyproject.toml asks for within its ranges, the
installed packages are the lock's (what `make test` / CI install), and rows say so."""
import os
import platform
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fusionbench.environment import LOCK_FILE, installed, lock_deviations, normalize, read_lock
from fusionbench.results import provenance
from tests.helpers import ROOT

UNLOCKED = os.environ.get("FUSIONBENCH_UNLOCKED") == "1"  # `make test-latest`: newest allowed releases


def _requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_lock_pins_every_requirement_within_its_range():
    pins = read_lock(ROOT / "requirements.lock")
    assert len(pins) > 50  # the whole tree, not just the direct dependencies
    for req in _requirements():
        name = normalize(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run scripts/lock.sh"
        version = pins[name]
        assert req.specifier.contains(version, prereleases=True), \
            f"requirements.lock pins {name}=={version}, outside pyproject.toml's {req.specifier}: run scripts/lock.sh"
    assert pins["torch"].startswith("2.13.0")  # the CPU build on local disk, never a CUDA build


def test_lock_reader_and_deviations(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\nLM_Eval==0.4.13 \\\n    --hash=sha256:00\n    # via x\nnumpy==0.0.1\n"
                    "no-such-package-fb==1.0 ; python_version >= '3'\n")
    assert read_lock(lock) == {"lm-eval": "0.4.13", "numpy": "0.0.1", "no-such-package-fb": "1.0"}
    dev = lock_deviations(lock)
    assert any(d.startswith("numpy: locked 0.0.1, installed ") for d in dev)
    assert "no-such-package-fb: locked 1.0, not installed" in dev
    assert not any(d.startswith("lm-eval:") for d in dev) or installed().get("lm-eval") != "0.4.13"


def test_installed_is_the_copy_import_finds_not_one_further_down_sys_path(tmp_path, monkeypatch):
    """A package's dist-info further down sys.path (setuptools' ``_vendor``, appended once torch.compile
    has imported setuptools, holds an older more-itertools) is not what is installed."""
    import sys

    from importlib.metadata import version

    real = version("packaging")
    (tmp_path / "packaging-0.0.1.dist-info").mkdir()
    (tmp_path / "packaging-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: packaging\nVersion: 0.0.1\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    assert installed()["packaging"] == real != "0.0.1"
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert installed()["packaging"] == "0.0.1" == version("packaging")  # first on the path: what import sees


@pytest.mark.skipif(UNLOCKED, reason="make test-latest runs the suite against the newest allowed releases")
def test_installed_packages_are_the_locked_ones():
    assert LOCK_FILE == ROOT / "requirements.lock"
    assert lock_deviations() == [], "the environment differs from requirements.lock: run scripts/setup.sh"
    row = provenance()
    assert row["env_matches_lock"] is True and len(row["env_lock"]) == 12
    assert row["version_transformers"] == read_lock()["transformers"]


def test_provenance_records_the_cpus_numeric_path():
    """A CPU's marketing name does not fix how its kernels round (two "AMD EPYC" machines of the main
    grid computed different numbers): rows record the instruction set torch dispatches to and the
    CPU's vendor family/model/stepping."""
    import torch

    row = provenance()
    assert row["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(row["cpu_capability"], str) and row["cpu_capability"]
    if platform.machine() == "x86_64" and Path("/proc/cpuinfo").exists():
        assert re.fullmatch(r"\S+ \d+/\d+/\d+ flags:[0-9a-f]{8}", row["cpu_model"]), row["cpu_model"]

"""What killed downloads and conversions leave behind is cleaned up or never trusted."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from fusionbench.assets.lm import checkpoint_ready
from fusionbench.assets.paths import cache_dir, install_dir, remove_stale_partials


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partials_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".bigbench-1.0.0.tar.gz.part-{dead}"
    stale.write_bytes(b"x" * 1000)
    stale_dir = tmp_path / f".smollm2.tmp-{dead}"
    stale_dir.mkdir()
    (stale_dir / "config.json").write_text("{}")
    live = tmp_path / f".other.tar.gz.part-{os.getpid()}"
    live.write_bytes(b"y")
    keep = tmp_path / "bigbench-1.0.0.tar.gz"
    keep.write_bytes(b"z")
    assert set(remove_stale_partials(tmp_path)) == {stale, stale_dir}
    assert not stale.exists() and not stale_dir.exists() and live.exists() and keep.exists()


def test_download_clears_a_killed_download_before_looking(monkeypatch):
    from fusionbench.assets.pypi import download

    dest = cache_dir("pypi", "some_pkg")
    (dest / "some_pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
    part = dest / f".some_pkg-2.0.tar.gz.part-{_dead_pid()}"
    part.write_bytes(b"half")
    assert download("some-pkg==1.0").name == "some_pkg-1.0-py3-none-any.whl"
    assert not part.exists()


def test_a_checkpoint_needs_its_tokenizer_and_is_installed_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"w")
    assert not checkpoint_ready(out)  # files moved in one by one by an older writer, cut short
    tmp = tmp_path / f".model.tmp-{os.getpid()}"
    tmp.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp / name).write_text("new")
    install_dir(tmp, out)
    assert checkpoint_ready(out) and not tmp.exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]
    assert (out / "config.json").read_text() == "new"


def test_assets_listing_says_which_cached_assets_are_prepared(tmp_path, monkeypatch):
    """``fusionbench assets`` looks at the cache (never fetches): an empty cache is 'not prepared'
    for every cached asset; a finished download or unpack is 'ready'; a partial download is not."""
    from fusionbench.assets.catalog import describe
    from fusionbench.data.sources.cifar_grid import CACHE_FILE

    monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path))

    def status():
        return {line.split()[0]: "not prepared" not in line for line in describe()[1:5]}

    assert status() == {"smollm2": False, "efficientnet_lite0": True, "cifar_grid": False, "text_suite": False}
    (cache_dir("data", "cifar10_test") / CACHE_FILE).write_bytes(b"npz")
    (cache_dir("pypi", "bigbench") / f".bigbench-1.0.0.tar.gz.part-{os.getpid()}").write_bytes(b"x")
    (cache_dir("debian", "r-cran-janeaustenr") / ".unpacked").write_text("")
    assert status() == {"smollm2": False, "efficientnet_lite0": True, "cifar_grid": True, "text_suite": False}
    (cache_dir("pypi", "bigbench") / "bigbench-1.0.0.tar.gz").write_bytes(b"x")
    assert status()["text_suite"] is True


def test_a_tests_monkeypatch_undo_keeps_it_off_the_users_cache(monkeypatch, tmp_path_factory):
    """conftest's cache isolation is its own MonkeyPatch: a test's undo() (test_resume's, after
    swapping training_step) used to send the rest of that test to ~/.cache/fusionbench."""
    isolated = str(tmp_path_factory.getbasetemp() / "cache")
    assert os.environ["FUSIONBENCH_CACHE"] == isolated
    monkeypatch.setenv("FUSIONBENCH_CACHE", "/elsewhere")
    monkeypatch.undo()
    assert os.environ["FUSIONBENCH_CACHE"] == isolated and str(cache_dir("data")).startswith(isolated)


def test_extracted_members_need_no_archive(monkeypatch, tmp_path):
    """A cache copied without its archives (an offline GPU machine given only the files a run
    reads) serves the members extracted before; a member never extracted still needs the archive."""
    import zipfile

    from fusionbench.assets import pypi

    monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path / "cache"))  # its own: it writes fake members

    out = cache_dir("pypi", "some_pkg_files")
    member = out / "some_pkg" / "weights.bin"
    member.parent.mkdir(parents=True)
    member.write_bytes(b"w")
    (out / "@_weights.bin.path").write_text(str(member))
    fetched = []
    real_download = pypi.download
    monkeypatch.setattr(pypi, "download", lambda req, sdist=False: fetched.append(req) or (_ for _ in ()).throw(
        pypi.AssetUnavailable("offline")))
    assert pypi.pypi_files("some-pkg==1.0", ["*/weights.bin"]) == {"*/weights.bin": member}
    assert fetched == []
    try:
        pypi.pypi_files("some-pkg==1.0", ["*/weights.bin", "*/other.bin"])
    except pypi.AssetUnavailable:
        pass
    else:
        raise AssertionError("a member never extracted was served without its archive")
    assert fetched == ["some-pkg==1.0"]
    monkeypatch.setattr(pypi, "download", real_download)
    # with the archive there, the missing member is extracted beside the one already there
    wheel = cache_dir("pypi", "some_pkg") / "some_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("some_pkg/other.bin", b"o")
    got = pypi.pypi_files("some-pkg==1.0", ["*/weights.bin", "*/other.bin"])
    assert got["*/weights.bin"] == member and got["*/other.bin"].read_bytes() == b"o"


def test_text_suite_is_ready_from_extracted_tasks_without_the_sdist(monkeypatch, tmp_path):
    from fusionbench.assets.catalog import _ready
    from fusionbench.config import TextEvalConfig

    # its own cache: the fake (empty) task files must not reach the session's other tests
    monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path / "cache"))

    (cache_dir("debian", "r-cran-janeaustenr") / ".unpacked").touch()
    out = cache_dir("pypi", "bigbench_files")
    tasks = TextEvalConfig().tasks
    for t in tasks[:-1]:
        f = out / t / "task.json"
        f.parent.mkdir(parents=True)
        f.write_text("{}")
        (out / f"@_bigbench_benchmark_tasks_{t}_task.json.path").write_text(str(f))
    assert not _ready("text_suite")  # one task of the default suite is missing
    f = out / tasks[-1] / "task.json"
    f.parent.mkdir(parents=True)
    f.write_text("{}")
    (out / f"@_bigbench_benchmark_tasks_{tasks[-1]}_task.json.path").write_text(str(f))
    assert _ready("text_suite")


def test_prepare_all_goes_past_an_asset_that_cannot_be_had_and_names_it(monkeypatch, capsys):
    """``fusionbench assets --prepare`` with no names: the CIFAR-10 set cannot be had without the
    bigbench sdist (gone from PyPI); the assets after it are still prepared, and the command ends
    with one error naming the missing one (exit code 2)."""
    from fusionbench.assets import catalog
    from fusionbench.cli import main
    from fusionbench.errors import AssetUnavailable

    done = []

    def gone():
        raise AssetUnavailable("https://pypi.org/simple/bigbench/ lists no sdist for 'bigbench==1.0.0'")

    fake = {name: (what, (lambda n=name: done.append(n))) for name, (what, _) in catalog.ASSETS.items()}
    fake["cifar_grid"] = (catalog.ASSETS["cifar_grid"][0], gone)
    monkeypatch.setattr(catalog, "ASSETS", fake)
    assert main(["assets", "--prepare"]) == 2
    assert done == [n for n in catalog.ASSETS if n != "cifar_grid"] and done[-1] == "text_suite"
    err = capsys.readouterr()
    assert "prepared all but 1 of 4 assets: cifar_grid (https://pypi.org/simple/bigbench/ lists no sdist" in err.err
    with pytest.raises(AssetUnavailable, match=r"^prepared all but 1 of 1 assets: cifar_grid"):  # by name alone
        catalog.prepare(["cifar_grid"])


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs Debian's dpkg-deb")
def test_processes_side_by_side_unpack_a_debian_package_once_and_all_read_it_whole(tmp_path):
    """scripts/gpu_lease.sh starts its sweeps side by side on an empty cache: each finds the whole
    tree (one unpacks, the others wait), none sees another's half-removed one."""
    pkg = tmp_path / "pkg"
    for i in range(1500):  # enough files that an unpack takes a while
        f = pkg / "usr/share/fbtest" / f"{i // 100}" / f"{i}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(str(i))
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text("Package: fbtest\nVersion: 1.0\nArchitecture: all\n"
                                        "Maintainer: t <t@t>\nDescription: t\n")
    cache = tmp_path / "cache"
    (cache / "debian/fbtest").mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-Znone", "--build", str(pkg), str(cache / "debian/fbtest/fbtest_1.0_all.deb")],
                   check=True, capture_output=True)
    code = ("import sys; from fusionbench.assets.debian import debian_package_dir as d; t = d('fbtest');"
            "n = len(list((t / 'usr/share/fbtest').rglob('*.txt'))); sys.exit(0 if n == 1500 else f'{n} files')")
    env = {**os.environ, "FUSIONBENCH_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    assert not (cache / "debian/fbtest/tree.tmp").exists()

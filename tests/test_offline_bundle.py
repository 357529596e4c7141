"""scripts/offline_run.sh, the receiving half of scripts/offline_bundle.sh (a machine with no
network): parts that arrive in several transfers, checked, unpacked once; the bundle's wheels first
on the path, the asset cache re-rooted, the commit's .git put beside a tree that has none."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from helpers import ROOT


def _wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fbdummy/__init__.py", "VERSION = 'bundled'\n")
        zf.writestr("fbdummy-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fbdummy\nVersion: 1.0\n")
        zf.writestr("fbdummy-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fbdummy-1.0.dist-info/RECORD", "")
    return buf.getvalue()


def _bundle(tmp: Path, old_root: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        add("wheels/fbdummy-1.0-py3-none-any.whl", _wheel())
        add("cache/pypi/bigbench_files/t/task.json", b"{}")
        add("cache/pypi/bigbench_files/@_t_task.json.path", f"{old_root}/pypi/bigbench_files/t/task.json".encode())
        add("ROOT", f"{old_root}\n".encode())
        add("PYTHON", f"{sys.version_info[0]}.{sys.version_info[1]}\n".encode())
        add("dotgit/HEAD", b"ref: refs/heads/main\n")
    return buf.getvalue()


def _env(tmp_path: Path, cache: Path, site: str = "site") -> dict[str, str]:
    """The script's folders under tmp_path, and this interpreter as the machine's ``python3``."""
    return {**os.environ, "PARTS": str(tmp_path / "parts"), "SITE": str(tmp_path / site),
            "FUSIONBENCH_CACHE": str(cache), "HOME": str(tmp_path),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_offline_run_collects_parts_then_unpacks_and_runs(tmp_path):
    data = _bundle(tmp_path, "/home/someone/.cache/fusionbench")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    half = len(data) // 2
    (a / "part-00").write_bytes(data[:half])
    (b / "part-01").write_bytes(data[half:])
    (b / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p).hexdigest()}  part-0{i}\n"
                                          for i, p in enumerate([data[:half], data[half:]])))
    tree = tmp_path / "tree"
    tree.mkdir()
    cache = tmp_path / "cache"
    env = _env(tmp_path, cache)
    script = str(ROOT / "scripts" / "offline_run.sh")
    first = subprocess.run(["bash", script, str(a)], cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "part-00" in first.stdout and not cache.exists()
    probe = ("import fbdummy, os; print(fbdummy.VERSION, os.environ['HF_HUB_OFFLINE'], os.environ['FB']); "
             "print(open(os.path.join(os.environ['FUSIONBENCH_CACHE'], 'pypi/bigbench_files/@_t_task.json.path')).read())")
    second = subprocess.run(["bash", script, str(b), "--", "python3", "-c", probe], cwd=tree, env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "bundled 1 fusionbench" in second.stdout
    assert f"{cache}/pypi/bigbench_files/t/task.json" in second.stdout  # the marker now names this cache
    assert (tree / ".git" / "HEAD").exists()


def test_offline_run_refuses_a_damaged_part(tmp_path):
    data = _bundle(tmp_path, "/x")
    d = tmp_path / "d"
    d.mkdir()
    (d / "part-00").write_bytes(data[:-10] + b"0123456789")
    (d / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  part-00\n")
    env = _env(tmp_path, tmp_path / "cache")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "offline_run.sh"), str(d), "--", "true"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "missing or damaged" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_offline_run_replaces_its_own_bundle_and_refuses_a_foreign_cache(tmp_path):
    def deliver(d: Path, data: bytes) -> None:
        d.mkdir()
        (d / "part-00").write_bytes(data)
        (d / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  part-00\n")

    cache, tree = tmp_path / "cache", tmp_path / "tree"
    tree.mkdir()
    env = _env(tmp_path, cache)
    script = str(ROOT / "scripts" / "offline_run.sh")
    deliver(tmp_path / "one", _bundle(tmp_path, "/a"))
    run = lambda d: subprocess.run(["bash", script, str(d), "--", "true"], cwd=tree, env=env,
                                   capture_output=True, text=True, timeout=120)
    assert run(tmp_path / "one").returncode == 0
    (cache / "stale").write_text("from the first bundle")
    deliver(tmp_path / "two", _bundle(tmp_path, "/b"))
    assert run(tmp_path / "two").returncode == 0 and not (cache / "stale").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "models").mkdir()
    env = _env(tmp_path, foreign, site="site2")
    proc = run(tmp_path / "two")
    assert proc.returncode != 0 and "did not unpack" in proc.stderr and (foreign / "models").exists()

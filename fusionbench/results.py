"""The results table: one JSON object per run (JSON Lines), appended atomically, with provenance."""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

PACKAGES = ("torch", "transformers", "peft", "lightning", "datasets", "omegaconf", "fusionbench",
            "accelerate", "gguf", "lm_eval", "tokenizers", "safetensors", "numpy", "pandas", "scipy")


@functools.cache
def git_sha() -> str:
    """The commit of the code this process runs, read once (the first call, at the start of a run):
    commits made while a long sweep runs do not relabel its rows. ``-dirty`` when tracked files
    differ from it (result tables aside: they are not code) or when the package has untracked source
    files (a new strategy file that the commit does not contain)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        # the result tables a run appends to are not code: they do not make the tree dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=here.parent, capture_output=True, text=True, timeout=10).stdout.strip()
        untracked = [f for f in subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", here.name],
                                               cwd=here.parent, capture_output=True, text=True, timeout=10).stdout.split("\n")
                     if f.endswith((".py", ".yaml", ".json"))]
        return sha.stdout.strip() + ("-dirty" if dirty or untracked else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def code_hash() -> str:
    """sha256 (12 hex) of the ``fusionbench`` package source as this process loaded it at its first
    call: every ``.py`` / ``.yaml`` / ``.json`` file under the package, tracked or not, by relative
    path and content. Two rows with the same code_hash ran the same code, whatever git says."""
    import hashlib

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in here.rglob("*") if p.suffix in (".py", ".yaml", ".json") and p.is_file()
                       and "__pycache__" not in p.parts):
        h.update(path.relative_to(here).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu:{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def provenance() -> dict[str, Any]:
    import torch

    from fusionbench.environment import lock_provenance

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[f"version_{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[f"version_{pkg}"] = None
    return {"git_sha": git_sha(), "code_hash": code_hash(), "device": device_name(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), **versions, **lock_provenance()}


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row; the file is replaced atomically, so a crash never leaves half a row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    line = json.dumps(row, sort_keys=True, default=str).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(old + line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_results(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    # json, not pd.read_json: the latter "infers" types and turns per-item strings such as
    # "0110..." (mm/choice/items) into floats
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    for col in df.columns:  # integral float columns without gaps read as integers (counts, layers)
        x = df[col]
        if x.dtype == float and x.notna().all() and len(x) and bool((x == x.round()).all()):
            df[col] = x.astype("int64")
    return df

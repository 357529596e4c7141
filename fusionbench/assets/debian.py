"""Fetch files that ship inside Debian packages (e.g. Jane Austen's novels in
``r-cran-janeaustenr``), without installing the package or its dependencies:
``apt-get download`` into the cache once, then ``dpkg-deb -x`` into a cache folder."""
from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

from fusionbench.assets.paths import cache_dir, install_dir
from fusionbench.errors import AssetUnavailable


def debian_package_dir(package: str) -> Path:
    """The unpacked file tree of a Debian package, fetched and unpacked once."""
    root = cache_dir("debian", package)
    tree = root / "tree"
    if (root / ".unpacked").exists():
        return tree
    # processes side by side (scripts/gpu_lease.sh, a sweep beside a test) unpack one at a time:
    # the second finds the first's tree instead of removing it while the first reads it
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".unpacked").exists():
            _fetch_and_unpack(package, root, tree)
    return tree


def _fetch_and_unpack(package: str, root: Path, tree: Path) -> None:
    debs = sorted(root.glob(f"{package}_*.deb"))
    if not debs:
        if not shutil.which("apt-get"):
            raise AssetUnavailable(f"Debian package {package!r} is needed and apt-get is not available; "
                                   f"put its .deb into {root} by hand")
        print(f"[fusionbench] downloading Debian package {package} (once) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(["apt-get", "download", "-q", package], cwd=root, capture_output=True, text=True)
        debs = sorted(root.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not debs:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
            raise AssetUnavailable(f"could not fetch Debian package {package!r} ({tail}); "
                                   f"put its .deb into {root} by hand")
    tmp = root / "tree.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetUnavailable(f"cannot unpack {debs[-1].name}: {proc.stderr.strip()}")
    install_dir(tmp, tree)
    (root / ".unpacked").touch()

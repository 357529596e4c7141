from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Root of fusionbench's caches: ``$FUSIONBENCH_CACHE`` or ``~/.cache/fusionbench``."""
    root = Path(os.environ.get("FUSIONBENCH_CACHE", Path.home() / ".cache" / "fusionbench"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete what killed processes left in ``folder``: ``.<name>.part-<pid>`` downloads and
    ``.<name>.tmp-<pid>`` conversions whose process is gone (a live one is still writing)."""
    import re
    import shutil

    removed = []
    for p in Path(folder).glob(".*"):
        m = re.search(r"\.(?:part|tmp)-(\d+)$", p.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def install_dir(tmp: Path, out: Path) -> Path:
    """Move a fully written folder ``tmp`` into place as ``out`` in one rename (an incomplete
    ``out`` from an older, non-atomic writer is removed first): readers see all of it or none."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

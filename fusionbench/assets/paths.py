from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Root of fusionbench's caches: ``$FUSIONBENCH_CACHE`` or ``~/.cache/fusionbench``."""
    root = Path(os.environ.get("FUSIONBENCH_CACHE", Path.home() / ".cache" / "fusionbench"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

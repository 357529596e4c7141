"""The locked environment: ``requirements.lock`` (made by ``scripts/lock.sh``, installed by
``scripts/setup.sh``) against what this process really runs with. Every results row records the
lock's hash and whether the installed packages equal it (``env_lock``, ``env_matches_lock``)."""
from __future__ import annotations

import functools
import hashlib
import re
from importlib import metadata
from pathlib import Path

LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (``lm_eval`` == ``LM-Eval``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path = LOCK_FILE) -> dict[str, str]:
    """``{normalized name: version}`` of every ``name==version`` line of a lock file."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    """``{normalized name: version}`` of every distribution this interpreter sees: per name the first
    on ``sys.path``, the one ``import`` and ``metadata.version`` find. A copy further down is not the
    installed one: torch.compile imports setuptools, which appends its ``_vendor`` folder (an older
    more-itertools' dist-info among its packages), and a row written after compiling would otherwise
    record an environment that differs from the lock."""
    out: dict[str, str] = {}
    for d in metadata.distributions():
        if d.metadata["Name"]:
            out.setdefault(normalize(d.metadata["Name"]), d.version)
    return out


def lock_deviations(path: str | Path = LOCK_FILE) -> list[str]:
    """What differs between the lock and the installed packages, one line each (empty: equal).
    Packages installed beside the lock (fusionbench itself, a user's extras) are not deviations."""
    have = installed()
    out = []
    for name, version in sorted(read_lock(path).items()):
        if name not in have:
            out.append(f"{name}: locked {version}, not installed")
        elif have[name] != version:
            out.append(f"{name}: locked {version}, installed {have[name]}")
    return out


@functools.cache
def lock_provenance() -> dict[str, object]:
    """``env_lock`` (first 12 hex of the lock file's sha256; None without a lock file, e.g. a
    non-editable install) and ``env_matches_lock`` (the installed versions equal the lock's)."""
    if not LOCK_FILE.exists():
        return {"env_lock": None, "env_matches_lock": None}
    digest = hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()[:12]
    return {"env_lock": digest, "env_matches_lock": not lock_deviations()}

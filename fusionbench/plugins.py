"""Strategies, datasets and evaluators defined outside the ``fusionbench`` package.

Two ways in, both registering with the same decorators as the shipped ones (``@register`` ...):

- ``plugins: [my_lab.fusions, experiments/plugins/my_fusion.py]`` in a config (or on the command
  line): each a module name or a ``.py`` file (relative to the working directory), imported when
  the config is loaded, before it is validated, so ``fusion: my_fusion`` resolves;
- an installed package's entry point in the group ``fusionbench.plugins``
  (``[project.entry-points."fusionbench.plugins"] my_lab = "my_lab.fusions"``), imported when a
  registry first loads, like a module of the package itself (a broken one is reported, not fatal).

Every imported plugin's source counts in :func:`fusionbench.results.code_hash` and is listed by
file hash in each row (``plugins``), so a row and a checkpoint say which plugin code made them."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from fusionbench.errors import FusionBenchError, first_line

ENTRY_POINT_GROUP = "fusionbench.plugins"
#: what this process imported: plugin spec -> sha256 (12 hex) of its source file
LOADED: dict[str, str] = {}
#: entry points that failed to import -> why (every registry reports them on lookup and in ``list``)
BROKEN: dict[str, str] = {}
_entry_points_loaded = False


def _source_hash(module) -> str:
    path = getattr(module, "__file__", None)
    if not path or not Path(path).is_file():
        return "unknown"
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def _import_file(path: Path):
    name = "fusionbench_plugin_" + hashlib.sha256(str(path).encode()).hexdigest()[:8] + "_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_plugins(specs) -> None:
    """Import each plugin (a module name or a ``.py`` path) once; one error naming the plugin and
    why, before anything else of the config is checked."""
    for i, spec in enumerate(specs or []):
        spec = str(spec)
        if spec in LOADED:
            continue
        is_file = spec.endswith(".py") or "/" in spec
        try:
            if is_file:
                path = Path(spec).expanduser().resolve()
                if not path.is_file():
                    raise FusionBenchError(f"plugins[{i}]: no such file: {spec} (a path is relative to the working "
                                           f"directory {Path.cwd()})")
                module = _import_file(path)
            else:
                module = importlib.import_module(spec)
        except FusionBenchError:
            raise
        except Exception as e:  # noqa: BLE001 - the plugin's own error, in one line
            what = "no module named " + repr(spec) if isinstance(e, ModuleNotFoundError) and e.name == spec else \
                f"{type(e).__name__}: {first_line(e)}"
            raise FusionBenchError(f"plugins[{i}] {spec!r} failed to import: {what}") from None
        LOADED[spec] = _source_hash(module)


def load_entry_points() -> None:
    """Import the installed packages' ``fusionbench.plugins`` entry points (once per process); a
    failing one goes into :data:`BROKEN` (the registries report it) instead of breaking every lookup."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            module = ep.load()
        except FusionBenchError:
            raise
        except Exception as e:  # noqa: BLE001
            BROKEN[f"plugin {ep.name} ({ep.value})"] = f"{type(e).__name__}: {first_line(e)}"
            continue
        LOADED[f"entry point {ep.name} ({ep.value})"] = _source_hash(module)

"""Strategies, datasets and evaluators defined outside the ``fusionbench`` package.

Two ways in, both registering with the same decorators as the shipped ones (``@register`` ...):

- ``plugins: [my_lab.fusions, experiments/plugins/my_fusion.py]`` in a config (or on the command
  line): each a module name or a ``.py`` file (relative to the working directory), imported when
  the config is loaded, before it is validated, so ``fusion: my_fusion`` resolves;
- an installed package's entry point in the group ``fusionbench.plugins``
  (``[project.entry-points."fusionbench.plugins"] my_lab = "my_lab.fusions"``), imported when a
  registry first loads, like a module of the package itself (a broken one is reported, not fatal).

Every imported plugin's source (its file, and the modules it loads from its own package or folder)
counts in :func:`fusionbench.results.code_hash` and is listed by hash in each row (``plugins``), so a
row and a checkpoint say which plugin code made them. That includes an installed entry point the
run's config does not use: it is code the process loaded, and it could have registered anything."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from fusionbench.errors import FusionBenchError, first_line

ENTRY_POINT_GROUP = "fusionbench.plugins"
#: what this process imported: plugin spec -> sha256 (12 hex) of its source (:func:`_source_hash`)
LOADED: dict[str, str] = {}
#: what has been imported (a file by its resolved path, so ./x.py and x.py are one plugin)
_IMPORTED: set[str] = set()
#: entry points that failed to import -> why (every registry reports them on lookup and in ``list``)
BROKEN: dict[str, str] = {}
_entry_points_loaded = False


def _source_hash(module, before: set[str]) -> str:
    """sha256 (12 hex) of the plugin's source: its file, and every module importing it loaded
    from under the same root (its package's folder, or the file's folder), so an edit to a helper
    module the plugin imports changes it too."""
    path = getattr(module, "__file__", None)
    if not path or not Path(path).is_file():
        return "unknown"
    top = sys.modules.get(module.__name__.split(".")[0], module)
    top_file = Path(getattr(top, "__file__", None) or path).resolve()
    is_package = top_file.name == "__init__.py"
    root = top_file.parent  # a package's folder, or the folder of a single-file plugin
    installed = {"site-packages", "dist-packages"} & set(root.parts)
    package = Path(__file__).resolve().parent  # fusionbench itself is in code_hash already
    files = {Path(path).resolve()}
    for name in set(sys.modules) - before:
        f = getattr(sys.modules.get(name), "__file__", None)
        if not f or not Path(f).is_file():
            continue
        f = Path(f).resolve()
        if f.is_relative_to(package):
            continue
        # the package's own modules; beside a single file, the single files next to it (never
        # a third-party library imported for the first time from a shared site-packages)
        if (is_package and f.is_relative_to(root)) or (not is_package and not installed and f.parent == root):
            files.add(f)
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(root).as_posix().encode() if f.is_relative_to(root) else f.name.encode())
        h.update(b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


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
        is_file = spec.endswith(".py") or "/" in spec
        key = str(Path(spec).expanduser().resolve()) if is_file else spec
        if key in _IMPORTED:
            continue
        before = set(sys.modules)
        try:
            if is_file:
                path = Path(key)
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
        _IMPORTED.add(key)
        LOADED[spec] = _source_hash(module, before)


def load_entry_points() -> None:
    """Import the installed packages' ``fusionbench.plugins`` entry points (once per process); a
    failing one goes into :data:`BROKEN` (the registries report it) instead of breaking every lookup."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        before = set(sys.modules)
        try:
            ep.load()
            module = sys.modules[ep.module]
        except FusionBenchError:
            raise
        except Exception as e:  # noqa: BLE001
            BROKEN[f"plugin {ep.name} ({ep.value})"] = f"{type(e).__name__}: {first_line(e)}"
            continue
        LOADED[f"entry point {ep.name} ({ep.value})"] = _source_hash(module, before)

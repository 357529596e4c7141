"""Name -> class/function registries. Adding a variant is one decorated definition in one file."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

from fusionbench.errors import FusionBenchError, did_you_mean, first_line

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package  # every module in it is imported before lookup
        self._items: dict[str, T] = {}
        self._loaded = False
        #: module -> why it failed to import: one broken file leaves every other entry usable, and a
        #: lookup of a name it may have defined says so
        self.broken: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                first = getattr(self._items[name], "__module__", "?")
                raise FusionBenchError(f"{self.kind} {name!r} is registered twice: in {first} and in "
                                       f"{getattr(obj, '__module__', '?')}")
            self._items[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj
        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                try:
                    importlib.import_module(f"{self.package}.{mod.name}")
                except FusionBenchError:
                    raise
                except Exception as e:  # noqa: BLE001 - reported on lookup and by `fusionbench list`
                    self.broken[f"{self.package}.{mod.name}"] = f"{type(e).__name__}: {first_line(e)}"
        from fusionbench import plugins  # installed packages' entry points register here too

        plugins.load_entry_points()
        self.broken.update(plugins.BROKEN)
        self._loaded = True

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            hint = did_you_mean(name, self._items)
            broken = "".join(f"; {m} failed to import ({why})" for m, why in self.broken.items())
            raise FusionBenchError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}{broken}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

"""Name -> class/function registries. Adding a variant is one decorated definition in one file."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

from fusionbench.errors import FusionBenchError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package  # every module in it is imported before lookup
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise FusionBenchError(f"{self.kind} {name!r} is registered twice")
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
                importlib.import_module(f"{self.package}.{mod.name}")
        self._loaded = True

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            hint = did_you_mean(name, self._items)
            raise FusionBenchError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

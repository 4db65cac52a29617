"""Name → object registries, extensible through Python entry points.

Third-party packages add passes, exporters, runners, models and datasets by
declaring entry points in the groups `edgeopt.passes`, `edgeopt.exporters`,
`edgeopt.runners`, `edgeopt.models` and `edgeopt.datasets`; each entry point
names the object to register under the entry point's name.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from edgeopt.errors import InputError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of plugins of one kind (passes, exporters, ...)."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = obj

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._items:
                continue
            try:
                self._items[ep.name] = ep.load()
            except Exception as exc:  # say which plugin is broken, in one line
                raise InputError(
                    f"plugin {self.kind} '{ep.name}' ({ep.value}) failed to load: {exc}"
                ) from exc

    def get(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._items:
            raise unknown_name(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_callable(spec: str, kind: str) -> Callable[..., Any]:
    """`package.module:factory` from a recipe: imported from PYTHONPATH or the current directory.

    This runs the user's code, which is why a recipe is as trusted as a script.
    """
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` would; last, so it never shadows a package
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import {kind} module '{module_name}': {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"module '{module_name}' has no {kind} factory '{attr}'")
    return factory

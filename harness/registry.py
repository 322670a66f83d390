"""Plugin registries, filled from entry points.

Each kind of plugin has an entry-point group `erasure_arena.<kind>`. The package's own
built-ins are declared in its `pyproject.toml` under those groups, the same door a
third-party package uses, so the engine never lists plugins by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("models", "defenses", "attacks", "evaluators", "prompt_sets", "trainers")


class UnknownPluginError(ValueError):
    """A config names a plugin that no installed package registers."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    target: str  # "module:attribute"
    distribution: str | None


class Registry:
    """Name-to-class lookup for one plugin kind. Classes load on first use."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; valid: {', '.join(KINDS)}")
        self.kind = kind
        self._entry_points: dict[str, EntryPoint] = {}
        self._extra: dict[str, type] = {}
        for entry_point in entry_points(group=f"erasure_arena.{kind}"):
            if entry_point.name in self._entry_points:
                log.warning(
                    "two packages register %s %r; keeping %s",
                    kind,
                    entry_point.name,
                    self._entry_points[entry_point.name].value,
                )
                continue
            self._entry_points[entry_point.name] = entry_point

    def names(self) -> list[str]:
        return sorted({*self._entry_points, *self._extra})

    def register(self, name: str, cls: type) -> None:
        """Add a plugin at run time (tests and notebooks); entry points are the normal way."""
        self._extra[name] = cls

    def get(self, name: str) -> type:
        if name in self._extra:
            return self._extra[name]
        if name not in self._entry_points:
            valid = ", ".join(self.names()) or "none installed"
            singular = self.kind.rstrip("s").replace("_", " ")
            raise UnknownPluginError(f"unknown {singular} {name!r}; valid: {valid}")
        return self._entry_points[name].load()

    def info(self) -> list[PluginInfo]:
        rows = []
        for name in self.names():
            if name in self._extra:
                cls = self._extra[name]
                rows.append(
                    PluginInfo(self.kind, name, f"{cls.__module__}:{cls.__qualname__}", None)
                )
                continue
            entry_point = self._entry_points[name]
            dist = entry_point.dist.name if entry_point.dist is not None else None
            rows.append(PluginInfo(self.kind, name, entry_point.value, dist))
        return rows


_REGISTRIES: dict[str, Registry] = {}


def registry(kind: str) -> Registry:
    """The process-wide registry for `kind`, built on first use."""
    if kind not in _REGISTRIES:
        _REGISTRIES[kind] = Registry(kind)
    return _REGISTRIES[kind]


def create(kind: str, name: str, **options: Any) -> Any:
    """Instantiate plugin `name` of `kind` with config options."""
    return registry(kind).get(name)(**options)

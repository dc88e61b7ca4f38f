"""Plugin discovery (pluggy + entry points) and the registries plugins fill.

Every plugin, built-in or third-party, is an entry point in the ``mixerdistill`` group. Built-ins are
those distributed by the ``mixerdistill`` package itself. ``MIXERDISTILL_PLUGINS`` (comma-separated entry
point names) restricts which third-party plugins load; an empty value loads none. A plugin that fails
to import or register produces one warning naming it, and everything else goes on.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from mixerdistill import hookspecs
from mixerdistill.errors import UserError

ENTRY_POINT_GROUP = "mixerdistill"
ALLOW_LIST_VARIABLE = "MIXERDISTILL_PLUGINS"
KINDS = ("mixers", "teachers", "stages", "datasets")


class PluginWarning(UserWarning):
    """A third-party plugin could not be loaded; the core carries on without it."""


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    """Named things of one kind ('mixers', 'teachers', ...), each remembered with the plugin that gave it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self.owners: dict[str, str] = {}

    def add(self, name: str, item: Any, owner: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{owner}: {self.kind} names must be non-empty strings, got {name!r}")
        if name in self._items:
            raise ValueError(
                f"{self.kind[:-1]} '{name}' is registered twice: by {self.owners[name]} and by {owner}"
            )
        self._items[name] = item
        self.owners[name] = owner

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise UserError(
                f"unknown {self.kind[:-1]} '{name}'{suggest(name, self._items)}; "
                f"available: {', '.join(sorted(self._items)) or 'none'}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool
    registers: dict[str, list[str]] = field(default_factory=dict)


class PluginManager:
    """Loads plugins and collects what each registers into one Registry per kind."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registries = {kind: Registry(kind) for kind in KINDS}
        self.plugins: dict[str, PluginInfo] = {}

    def load_entry_points(self) -> None:
        allowed = os.environ.get(ALLOW_LIST_VARIABLE)
        allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
        for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_builtin_first):
            distribution = entry_point.dist.name if entry_point.dist else "unknown"
            builtin = distribution == "mixerdistill"
            if not builtin and allowed_names is not None and entry_point.name not in allowed_names:
                continue
            version = entry_point.dist.version if entry_point.dist else "unknown"
            try:
                plugin = entry_point.load()
            except Exception as error:  # a broken plugin must never take the core down
                if builtin:
                    raise
                warnings.warn(
                    f"plugin '{entry_point.name}' ({distribution}) failed to import: {error!r}; skipped",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            self.register(plugin, entry_point.name, distribution=distribution, version=version, builtin=builtin)

    def register(self, plugin: Any, name: str, *, distribution: str = "local", version: str = "0",
                 builtin: bool = False) -> PluginInfo:
        """Register one plugin object/module and run its ``register_*`` hooks."""
        if name in self.plugins:
            raise ValueError(f"plugin '{name}' is already registered")
        info = PluginInfo(name, distribution, version, builtin)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
            for kind in KINDS:
                added: list[str] = []

                def register_one(thing_name, thing, _kind=kind, _added=added):
                    self.registries[_kind].add(thing_name, thing, owner=name)
                    _added.append(thing_name)

                for implementation in getattr(self.pm.hook, f"register_{kind}").get_hookimpls():
                    if implementation.plugin is plugin:
                        implementation.function(register=register_one)
                if added:
                    info.registers[kind] = added
        except Exception as error:
            self._forget(plugin, name)
            if builtin:
                raise
            warnings.warn(f"plugin '{name}' ({distribution}) failed to register: {error}; skipped",
                          PluginWarning, stacklevel=2)
            return info
        self.plugins[name] = info
        return info

    def _forget(self, plugin: Any, name: str) -> None:
        if self.pm.is_registered(plugin):
            self.pm.unregister(plugin)
        for registry in self.registries.values():
            for thing_name in [n for n, owner in registry.owners.items() if owner == name]:
                del registry._items[thing_name]
                del registry.owners[thing_name]

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        self._forget(plugin, name)
        self.plugins.pop(name, None)


def _builtin_first(entry_point) -> tuple[int, str]:
    distribution = entry_point.dist.name if entry_point.dist else ""
    return (0 if distribution == "mixerdistill" else 1, entry_point.name)


_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
        _manager.load_entry_points()
    return _manager


def registry(kind: str) -> Registry:
    return get_manager().registries[kind]


def get_mixer(name: str):
    return registry("mixers").get(name)


def get_teacher_adapter(name: str):
    return registry("teachers").get(name)


def get_stage(name: str):
    return registry("stages").get(name)


def get_dataset(name: str):
    return registry("datasets").get(name)

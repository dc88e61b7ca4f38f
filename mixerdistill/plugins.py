"""Plugin discovery (pluggy + entry points) and the registries plugins fill.

Every plugin, built-in or third-party, is an entry point in the ``mixerdistill`` group. Built-ins are
those distributed by the ``mixerdistill`` package itself; their names cannot be taken by another plugin.

* ``MIXERDISTILL_PLUGINS`` (comma-separated entry-point names) restricts which third-party plugins load;
  an empty value loads none, and a name no installed plugin has is an error.
* A plugin that fails to import or register produces a warning with the file, line and exception, and
  everything else goes on; an unknown-name error later mentions it (and the plugins the allow-list left out).
* A name registered by two third-party plugins is ambiguous: looking it up is an error naming both
  packages, unless the recipe qualifies it as ``PACKAGE:NAME`` (distribution or entry-point name) or the
  allow-list leaves one of them out.
* The plugin set is read once per process and handed to child processes (torchrun ranks) through
  ``MIXERDISTILL_PLUGIN_SET``, so a plugin installed while a run goes on is never picked up half-way.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import pluggy

from mixerdistill import hookspecs
from mixerdistill.errors import UserError

ENTRY_POINT_GROUP = "mixerdistill"
BUILTIN_DISTRIBUTION = "mixerdistill"
ALLOW_LIST_VARIABLE = "MIXERDISTILL_PLUGINS"
PLUGIN_SET_VARIABLE = "MIXERDISTILL_PLUGIN_SET"
KINDS = ("mixers", "teachers", "stages", "datasets")


class PluginWarning(UserWarning):
    """A third-party plugin could not be loaded, or two plugins claim one name; the core carries on."""


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class PluginInfo:
    """A loaded plugin: its entry-point name, the distribution that ships it and what it registers."""

    name: str
    distribution: str
    version: str
    builtin: bool
    source: str = ""  # the plugin module's file
    registers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"'{self.name}' ({self.distribution} {self.version}{', ' + self.source if self.source else ''})"


@dataclass
class PluginProblem:
    """A plugin that did not load: ``reason`` is 'failed' (with the error) or 'excluded' (by the allow-list)."""

    name: str
    distribution: str
    reason: str
    message: str = ""


class Registry:
    """Named things of one kind ('mixers', 'teachers', ...), each remembered with the plugin(s) that gave it.

    A name claimed by two third-party plugins keeps both claims; ``get`` refuses it unless qualified.
    """

    def __init__(self, kind: str, problems: list[PluginProblem] | None = None):
        self.kind = kind
        self.claims: dict[str, list[tuple[PluginInfo, Any]]] = {}
        self._problems = problems if problems is not None else []

    @property
    def singular(self) -> str:
        return self.kind[:-1]

    def add(self, name: str, item: Any, owner: PluginInfo) -> None:
        """Record ``owner``'s claim on ``name``; ValueError for a built-in name or a second claim by one plugin."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"{self.kind} names must be non-empty strings without ':', got {name!r}")
        for other, _ in self.claims.get(name, []):
            if other.builtin or owner.builtin:
                raise ValueError(
                    f"{self.singular} '{name}' belongs to the built-in plugin '{other.name}'; "
                    f"plugin {owner.label} cannot take it over: rename it"
                )
            if other.name == owner.name:
                raise ValueError(f"plugin {owner.label} registers {self.singular} '{name}' twice")
        self.claims.setdefault(name, []).append((owner, item))

    def forget(self, plugin_name: str) -> None:
        for name in list(self.claims):
            self.claims[name] = [claim for claim in self.claims[name] if claim[0].name != plugin_name]
            if not self.claims[name]:
                del self.claims[name]

    def conflicts(self) -> dict[str, list[PluginInfo]]:
        """Names claimed by more than one plugin → the claimants."""
        return {name: [owner for owner, _ in claims] for name, claims in self.claims.items() if len(claims) > 1}

    def owner(self, name: str) -> PluginInfo:
        return self._claim(name)[0]

    def get(self, name: str) -> Any:
        """The thing registered as ``name`` or ``PACKAGE:name``; UserError when unknown or ambiguous."""
        return self._claim(name)[1]

    def _claim(self, name: str) -> tuple[PluginInfo, Any]:
        package, _, bare = name.rpartition(":")
        claims = self.claims.get(bare, [])
        if package:
            claims = [(owner, item) for owner, item in claims if package in (owner.distribution, owner.name)]
        if len(claims) == 1:
            return claims[0]
        if claims:
            claimants = " and ".join(owner.label for owner, _ in claims)
            choices = " or ".join(f"'{owner.distribution}:{bare}'" for owner, _ in claims)
            raise UserError(
                f"{self.singular} '{bare}' is registered by two plugins, {claimants}; name one "
                f"package in the recipe ({choices}) or leave one plugin out with {ALLOW_LIST_VARIABLE}"
            )
        known = f" from package '{package}'" if package and bare in self.claims else ""
        raise UserError(
            f"unknown {self.singular} '{name}'{known}{suggest(bare, self.claims)}; "
            f"available: {', '.join(self.names()) or 'none'}{self._missing_plugins()}"
        )

    def _missing_plugins(self) -> str:
        notes = [
            f"plugin '{p.name}' ({p.distribution}) failed to load: {p.message}"
            for p in self._problems
            if p.reason == "failed"
        ]
        excluded = [f"'{p.name}' ({p.distribution})" for p in self._problems if p.reason == "excluded"]
        if excluded:
            notes.append(
                f"{ALLOW_LIST_VARIABLE}={os.environ.get(ALLOW_LIST_VARIABLE, '')!r} leaves out "
                f"the installed plugin(s) {', '.join(excluded)}"
            )
        return "".join(f"\n  note: {note}" for note in notes)

    def names(self) -> list[str]:
        return sorted(self.claims)

    def __contains__(self, name: str) -> bool:
        return name.rpartition(":")[2] in self.claims


def describe_exception(error: BaseException) -> str:
    """'FILE:LINE: Type: message' for the deepest frame outside the import machinery and this module."""
    if isinstance(error, SyntaxError) and error.filename:
        where = f"{error.filename}:{error.lineno}"
    else:
        frames = [
            frame
            for frame in traceback.extract_tb(error.__traceback__)
            if not frame.filename.startswith("<frozen")
            and "importlib" not in frame.filename
            and frame.filename != __file__
        ]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "unknown location"
    return f"{where}: {type(error).__name__}: {error}"


def _source_file(plugin: Any) -> str:
    try:
        return inspect.getsourcefile(plugin if inspect.ismodule(plugin) else type(plugin)) or ""
    except TypeError:
        return ""


class PluginManager:
    """Loads plugins and collects what each registers into one Registry per kind."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.problems: list[PluginProblem] = []
        self.registries = {kind: Registry(kind, self.problems) for kind in KINDS}
        self.plugins: dict[str, PluginInfo] = {}

    def load_entry_points(self) -> None:
        """Load the built-ins and the allowed third-party plugins (those of ``MIXERDISTILL_PLUGIN_SET`` in a
        child process); warns about each plugin that fails and each name two plugins claim."""
        entry_points = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_builtin_first)
        pinned = PLUGIN_SET_VARIABLE in os.environ
        allowed = _allowed_names(entry_points, PLUGIN_SET_VARIABLE if pinned else ALLOW_LIST_VARIABLE)
        for entry_point in entry_points:
            distribution = entry_point.dist.name if entry_point.dist else "unknown"
            version = entry_point.dist.version if entry_point.dist else "unknown"
            builtin = distribution == BUILTIN_DISTRIBUTION
            if not builtin and allowed is not None and entry_point.name not in allowed:
                if not pinned:
                    self.problems.append(PluginProblem(entry_point.name, distribution, "excluded"))
                continue
            try:
                plugin = entry_point.load()
            except Exception as error:  # a broken plugin must never take the core down
                if builtin:
                    raise
                self._failed(entry_point.name, distribution, f"failed to import: {describe_exception(error)}")
                continue
            self.register(plugin, entry_point.name, distribution=distribution, version=version, builtin=builtin)
        for registry in self.registries.values():
            for name, owners in registry.conflicts().items():
                warnings.warn(
                    f"{registry.singular} '{name}' is registered by {' and '.join(o.label for o in owners)}; "
                    f"a recipe must name the package ('{owners[0].distribution}:{name}')",
                    PluginWarning,
                    stacklevel=2,
                )

    def pin_for_child_processes(self) -> None:
        """Make child processes (torchrun ranks) load exactly this process's third-party plugins."""
        os.environ[PLUGIN_SET_VARIABLE] = ",".join(sorted(n for n, p in self.plugins.items() if not p.builtin))

    def register(
        self, plugin: Any, name: str, *, distribution: str = "local", version: str = "0", builtin: bool = False
    ) -> PluginInfo:
        """Register one plugin object/module and run its ``register_*`` hooks."""
        if name in self.plugins:
            raise ValueError(f"plugin '{name}' is already registered")
        info = PluginInfo(name, distribution, version, builtin, _source_file(plugin))
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
            for kind in KINDS:
                added: list[str] = []

                def register_one(thing_name, thing, _kind=kind, _added=added):
                    self.registries[_kind].add(thing_name, thing, owner=info)
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
            self._failed(name, distribution, f"failed to register: {describe_exception(error)}")
            return info
        self.plugins[name] = info
        return info

    def _failed(self, name: str, distribution: str, message: str) -> None:
        self.problems.append(PluginProblem(name, distribution, "failed", message))
        warnings.warn(f"plugin '{name}' ({distribution}) {message}; skipped", PluginWarning, stacklevel=3)

    def _forget(self, plugin: Any, name: str) -> None:
        if self.pm.is_registered(plugin):
            self.pm.unregister(plugin)
        for registry in self.registries.values():
            registry.forget(name)

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        self._forget(plugin, name)
        self.plugins.pop(name, None)

    def snapshot(self) -> dict:
        """Everything ``mixerdistill plugins --json`` reports."""
        return {
            "plugins": [asdict(info) for info in self.plugins.values()],
            "problems": [asdict(problem) for problem in self.problems],
            "conflicts": {
                kind: {name: [o.name for o in owners] for name, owners in registry.conflicts().items()}
                for kind, registry in self.registries.items()
                if registry.conflicts()
            },
            **{kind: registry.names() for kind, registry in self.registries.items()},
        }


def _allowed_names(entry_points, variable: str) -> set[str] | None:
    """The third-party plugins the environment ``variable`` names (None when unset: all); UserError for a
    name no installed plugin has."""
    value = os.environ.get(variable)
    if value is None:
        return None
    allowed = {name.strip() for name in value.split(",") if name.strip()}
    installed = {entry_point.name for entry_point in entry_points}
    third_party = sorted(ep.name for ep in entry_points if _builtin_first(ep)[0])
    for name in sorted(allowed - installed):
        raise UserError(
            f"{variable}: no installed plugin is named '{name}'{suggest(name, installed)}; "
            f"installed third-party plugins: {', '.join(third_party) or 'none'}"
        )
    return allowed


def _builtin_first(entry_point) -> tuple[int, str]:
    distribution = entry_point.dist.name if entry_point.dist else ""
    return (0 if distribution == BUILTIN_DISTRIBUTION else 1, entry_point.name)


_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide plugin manager, loading entry points on first use (once per process)."""
    global _manager
    if _manager is None:
        manager = PluginManager()
        manager.load_entry_points()
        _manager = manager
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

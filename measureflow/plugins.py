"""Plugin hooks, the plugin manager and the registry (DESIGN.md "Plugins").

Every field, integrator, writer, observable, schedule and executor — built-in or third party — is
registered the same way: a module (or any object) defines ``measureflow_register_<kind>(registry)``
hook implementations marked with :data:`hookimpl`, and calls ``registry.add_<kind>(name, obj)``.

* Built-ins are loaded from the fixed tuple :data:`BUILTIN_PLUGINS`.
* Third-party packages are found through the entry-point group ``measureflow``; each loads inside
  its own try/except so a broken one is reported by name and skipped (set the environment variable
  ``MEASUREFLOW_STRICT_PLUGINS=1`` to make it fatal).
* A plugin that implements a hook no spec declares (``measureflow_register_field`` for
  ``measureflow_register_fields``) is broken like one that fails to import: the error names the hook,
  the closest valid one and the plugin. A built-in with such an error is always fatal.
* A name registered twice is an error naming both owners; an unknown name lists the registered ones.

No hook is ever called inside a step loop: hooks only fill the registry, once per process.

Example (a third-party package)::

    import measureflow

    @measureflow.hookimpl
    def measureflow_register_fields(registry):
        registry.add_field("harmonic", HarmonicField)

and in its pyproject.toml::

    [project.entry-points.measureflow]
    harmonic = "my_package.plugin"
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import threading
import warnings
from importlib import metadata
from typing import Any

import attrs
import pluggy

from .errors import ParameterError, PluginError, UnknownPluginError

__all__ = [
    "hookimpl",
    "hookspec",
    "Registry",
    "PluginEntry",
    "get_registry",
    "reload_registry",
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "HOOK_NAMES",
]

PROJECT = "measureflow"
ENTRY_POINT_GROUP = "measureflow"
STRICT_ENV = "MEASUREFLOW_STRICT_PLUGINS"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Registry kinds, in the order their hooks run; singular names are used by add_<kind>().
KINDS = {
    "fields": "field",
    "integrators": "integrator",
    "writers": "writer",
    "observables": "observable",
    "schedules": "schedule",
    "executors": "executor",
}

#: The hooks a plugin may implement, in the order they run.
HOOK_NAMES = tuple(f"measureflow_register_{kind}" for kind in KINDS)

#: Built-in plugin modules, loaded in this order before any third-party plugin.
BUILTIN_PLUGINS = (
    "measureflow.integrators.builtin",
    "measureflow.io.builtin",
    "measureflow.observables",
    "measureflow.flow_sde",
    "measureflow.sweep.executors",
    "measureflow_plugins.linear",
    "measureflow_plugins.schedules",
    "measureflow_plugins.flow_matching",
    "measureflow_plugins.ou_bridge",
    "measureflow_plugins.learned",
    "measureflow_plugins.kl",
    "measureflow_plugins.fisher",
    "measureflow_plugins.w2",
    "measureflow_plugins.mmd",
    "measureflow_plugins.interaction",
    "measureflow_plugins.sliced_wasserstein",
    "measureflow_plugins.sinkhorn",
    "measureflow_plugins.porous_medium",
    "measureflow_plugins.jko",
    "measureflow_plugins.ray_executor",
    "measureflow_plugins.drifting",
    "measureflow_plugins.attention",
    "measureflow_plugins.mean_field_network",
)


class HookSpecs:
    """The registration hooks (one per registry kind)."""

    @hookspec
    def measureflow_register_fields(self, registry: "Registry") -> None:
        """Register velocity fields: ``registry.add_field(name, factory)``."""

    @hookspec
    def measureflow_register_integrators(self, registry: "Registry") -> None:
        """Register integrators: ``registry.add_integrator(name, factory)``."""

    @hookspec
    def measureflow_register_writers(self, registry: "Registry") -> None:
        """Register writers (trajectory sinks): ``registry.add_writer(name, factory)``."""

    @hookspec
    def measureflow_register_observables(self, registry: "Registry") -> None:
        """Register observables ``f(state, **params) -> (R,) or (R, ...)``: ``registry.add_observable``."""

    @hookspec
    def measureflow_register_schedules(self, registry: "Registry") -> None:
        """Register interpolation schedules: ``registry.add_schedule(name, factory)``."""

    @hookspec
    def measureflow_register_executors(self, registry: "Registry") -> None:
        """Register sweep executors: ``registry.add_executor(name, factory)``."""


@attrs.frozen
class PluginEntry:
    """One registered object and where it came from."""

    kind: str
    name: str
    obj: Any
    owner: str  # the plugin (module or distribution) that registered it
    version: str


class Registry:
    """Name → object tables for every plugin kind, filled by the registration hooks."""

    def __init__(self):
        self._tables: dict[str, dict[str, PluginEntry]] = {kind: {} for kind in KINDS}
        self._owner = ("<user>", "")
        self.failures: list[tuple[str, str]] = []  # (plugin, error) of skipped third-party plugins
        self.plugins: dict[str, str] = {}  # loaded plugin name -> version

    # -- adding -----------------------------------------------------------------------------------
    def add(self, kind: str, name: str, obj: Any) -> None:
        if kind not in self._tables:
            raise PluginError(f"unknown registry kind {kind!r}; kinds are {', '.join(self._tables)}")
        if not isinstance(name, str) or not name:
            raise PluginError(f"a {KINDS[kind]} must be registered under a non-empty string name, got {name!r}")
        table = self._tables[kind]
        owner, version = self._owner
        if name in table:
            raise PluginError(
                f"duplicate {KINDS[kind]} name {name!r}: registered by {table[name].owner!r} "
                f"and again by {owner!r}; rename one of them"
            )
        table[name] = PluginEntry(kind, name, obj, owner, version)

    def add_field(self, name, factory):
        self.add("fields", name, factory)

    def add_integrator(self, name, factory):
        self.add("integrators", name, factory)

    def add_writer(self, name, factory):
        self.add("writers", name, factory)

    def add_observable(self, name, function):
        self.add("observables", name, function)

    def add_schedule(self, name, factory):
        self.add("schedules", name, factory)

    def add_executor(self, name, factory):
        self.add("executors", name, factory)

    # -- lookup -------------------------------------------------------------------------------------
    def entry(self, kind: str, name: str) -> PluginEntry:
        table = self._tables[kind]
        try:
            return table[name]
        except KeyError:
            known = ", ".join(sorted(table)) or "(none)"
            raise UnknownPluginError(
                f"no {KINDS[kind]} named {name!r}; registered {kind}: {known}"
            ) from None

    def get(self, kind: str, name: str) -> Any:
        return self.entry(kind, name).obj

    def names(self, kind: str) -> list[str]:
        return sorted(self._tables[kind])

    def entries(self, kind: str) -> list[PluginEntry]:
        return [self._tables[kind][n] for n in sorted(self._tables[kind])]

    def build(self, kind: str, name: str, /, *args, **params):
        """Call the factory registered as ``name`` in ``kind`` with ``args`` and ``params``, after
        checking them against its signature: a missing or unknown parameter is a
        :class:`~measureflow.errors.ParameterError` naming it and listing the factory's parameters."""
        factory = self.get(kind, name)
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):  # a builtin or C callable: nothing to check
            signature = None
        if signature is not None:
            try:
                signature.bind(*args, **params)
            except TypeError as exc:
                raise ParameterError(_binding_message(KINDS[kind], name, signature, args, params, exc)) from None
        return factory(*args, **params)

    def field(self, name: str, /, **params):
        """Build the registered field ``name`` with ``params``.

        ``geometry="wasserstein" | "fisher_rao" | "wfr"``, with ``rate=α`` and ``balanced=``, picks the
        geometry a gradient flow descends in (:func:`measureflow.geometry.with_geometry`, MATH.md §15.6).
        """
        geometry = params.pop("geometry", None)
        if geometry is not None:
            rate, balanced = params.pop("rate", None), params.pop("balanced", True)
        field = self.build("fields", name, **params)
        if getattr(field, "name", "field") == "field":
            try:
                field.name = name
            except AttributeError:
                pass
        if geometry is not None:
            from .geometry import with_geometry

            field = with_geometry(field, geometry, rate, balanced, registry=self)
        return field

    def integrator(self, name: str, /, **params):
        return self.build("integrators", name, **params)

    def writer(self, name: str, *args, **params):
        return self.build("writers", name, *args, **params)

    def schedule(self, name: str, /, **params):
        """Build the registered interpolation schedule ``name`` with ``params``."""
        return self.build("schedules", name, **params)

    def owner_of(self, kind: str, name: str) -> str:
        return self.entry(kind, name).owner

    def version_of(self, obj_or_name, kind: str = "fields") -> str:
        return self.entry(kind, obj_or_name).version

    # -- loading ------------------------------------------------------------------------------------
    def _load(self, pm: pluggy.PluginManager, plugin: Any, owner: str, version: str) -> None:
        """Run one plugin's registration hooks into a staging registry, then commit atomically.

        Each hook is called through a pluggy subset caller that leaves out every other registered
        plugin, so what this call adds belongs to ``owner`` and a failure half-way adds nothing.
        """
        staged = Registry()
        staged._tables = {k: dict(v) for k, v in self._tables.items()}
        staged._owner = (owner, version)
        others = [p for p in pm.get_plugins() if p is not plugin]
        for kind in KINDS:
            pm.subset_hook_caller(f"measureflow_register_{kind}", remove_plugins=others)(registry=staged)
        self._tables = staged._tables
        self.plugins[owner] = version



def _binding_message(what: str, name: str, signature: inspect.Signature, args: tuple, params: dict,
                     exc: TypeError) -> str:
    """One line saying which parameter of the plugin ``name`` is missing or unknown."""
    accepted = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    listing = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in accepted) or "(none)"
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [] if takes_any else sorted(set(params) - {p.name for p in accepted})
    positional = [p for p in accepted if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][len(args):]
    missing = [p.name for p in [*positional, *(p for p in accepted if p.kind == p.KEYWORD_ONLY)]
               if p.default is p.empty and p.name not in params]
    if unknown:
        problem = f"has no parameter {', '.join(map(repr, unknown))}"
    elif missing:
        problem = f"needs the parameter{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
    else:
        problem = f"cannot take these arguments ({exc})"
    return f"{what} {name!r} {problem}; its parameters: {listing}"


def _check_hook_names(pm: pluggy.PluginManager, plugin: Any, label: str) -> None:
    """Refuse a plugin that implements a hook no spec declares (a misspelling registers nothing).

    pluggy keeps such implementations pending instead of failing (``check_pending`` finds them);
    this is the same test restricted to one plugin, so that the message can name it.
    """
    unknown = [
        caller.name
        for caller in pm.get_hookcallers(plugin) or ()
        if not caller.has_spec()
        and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
    ]
    if not unknown:
        return
    problems = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, HOOK_NAMES, n=1)
        problems.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    several = len(problems) > 1
    raise PluginError(
        f"plugin {label!r}: {' and '.join(problems)} "
        f"{'are not measureflow hooks' if several else 'is not a measureflow hook'}, so pluggy would never call "
        f"{'them' if several else 'it'} and the plugin would register nothing; the hooks are "
        f"{', '.join(HOOK_NAMES)}. Rename the function{'s' if several else ''} to one of them"
    )


def _register(pm: pluggy.PluginManager, registry: Registry, plugin: Any, label: str, owner: str, version: str) -> None:
    """Register ``plugin`` with the manager, check its hook names, and run its registration hooks."""
    pm.register(plugin, name=label)
    _check_hook_names(pm, plugin, label)
    registry._load(pm, plugin, owner, version)


_lock = threading.Lock()
_registry: Registry | None = None


def _version_of_module(module_name: str) -> str:
    top = module_name.split(".")[0]
    if top in ("measureflow", "measureflow_plugins"):
        from . import __version__

        return __version__
    mod = sys.modules.get(top)
    return str(getattr(mod, "__version__", "unknown"))


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    return pm


def _register_third_party(pm: pluggy.PluginManager, registry: Registry, load, label: str, source: str,
                          owner: str, version: str) -> None:
    """Load and register one third-party plugin; a failure is reported by name and skipped (strict: fatal)."""
    plugin = None
    try:
        plugin = load()
        if pm.is_registered(plugin):
            return
        _register(pm, registry, plugin, label, owner, version)
    except Exception as exc:  # noqa: BLE001 - a third-party plugin must not break the engine
        message = f"{type(exc).__name__}: {exc}"
        if _strict():
            raise PluginError(f"measureflow plugin {label!r} ({source}) failed to load: {message}") from exc
        registry.failures.append((label, message))
        warnings.warn(
            f"measureflow plugin {label!r} ({source}) failed to load and was skipped: {message} "
            f"(set {STRICT_ENV}=1 to make this fatal)",
            RuntimeWarning,
            stacklevel=4,
        )
        if plugin is not None and pm.get_name(plugin) == label:
            pm.unregister(plugin)


def _build_registry(extra_plugins=()) -> Registry:
    registry = Registry()
    pm = _new_manager()
    for module_name in BUILTIN_PLUGINS:
        # A broken built-in is a bug in measureflow itself: always fatal.
        module = importlib.import_module(module_name)
        _register(pm, registry, module, module_name, module_name, _version_of_module(module_name))

    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        owner = dist.name if dist is not None else ep.value
        version = dist.version if dist is not None else "unknown"
        label = f"{owner}:{ep.name}" if dist is not None else ep.name
        _register_third_party(pm, registry, ep.load, label, ep.value, owner, version)

    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", repr(plugin))
        _register_third_party(pm, registry, lambda plugin=plugin: plugin, name, "extra plugin", name,
                              _version_of_module(name))
    return registry


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                _registry = _build_registry()
    return _registry


def reload_registry(extra_plugins=()) -> Registry:
    """Rebuild the registry (after installing a plugin, or with extra in-process plugin objects)."""
    global _registry
    with _lock:
        _registry = _build_registry(extra_plugins)
    return _registry

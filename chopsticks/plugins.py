"""The plugin manager: plugin discovery, and the registries of facts, tasks and tunnel schemes.

Plugins are named by entry points in the ``chopsticks`` group and loaded
lazily, the first time something asks for a fact, a task, a tunnel scheme or
the plugin list.  A plugin that fails to import, or whose hook raises, is
reported (a :class:`PluginWarning` and its status in ``chopsticks
list-plugins``) and left out; the others keep working.

Two environment variables, read when plugins are first loaded:

``CHOPSTICKS_DISABLE_PLUGIN_AUTOLOAD=1``
    load no entry-point plugin (those named in ``CHOPSTICKS_PLUGINS`` still load);
``CHOPSTICKS_PLUGINS=name1,name2``
    load only these, each an entry-point name or a distribution name.

The built-in tunnel schemes (``ssh``, ``local``, ``sudo``, ``docker``) are a
plugin too (:class:`chopsticks.hosts.CoreTunnels`), registered in code and
never disabled.  Host strings are parsed in :mod:`chopsticks.hosts`; the
``chopsticks.facts`` and ``chopsticks.tasks`` namespaces live in
:mod:`chopsticks.namespaces`.
"""
from __future__ import annotations

import difflib
import inspect
import keyword
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import pluggy

from chopsticks import hookspecs
from chopsticks.errors import ChopsticksError

if sys.version_info >= (3, 10):
    from importlib import metadata as importlib_metadata
else:  # pragma: no cover - the backport has EntryPoint.dist on 3.9
    import importlib_metadata

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginError",
    "PluginWarning",
    "UnknownNameError",
    "PluginInfo",
    "Registration",
    "PluginManager",
    "get_plugin_manager",
    "set_plugin_manager",
    "KNOWN_PROVIDERS",
]

ENTRY_POINT_GROUP = "chopsticks"
DISABLE_AUTOLOAD_ENV = "CHOPSTICKS_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_LIST_ENV = "CHOPSTICKS_PLUGINS"

#: Where a well-known name comes from, so that asking for it without the
#: plugin installed says what to install.
KNOWN_PROVIDERS: Dict[str, Dict[str, str]] = {
    "fact": dict.fromkeys(
        (
            "ip interfaces default_route hostname fqdn os_release kernel cpu memory "
            "disks mounts users python uptime package_manager service_manager "
            "virtualization"
        ).split(),
        "chopsticks-facts",
    ),
    "task": {
        **dict.fromkeys("install remove latest update_cache".split(), "chopsticks-pkg"),
        **dict.fromkeys("file directory line link".split(), "chopsticks-files"),
        **dict.fromkeys("service user group".split(), "chopsticks-system"),
    },
    "tunnel": {},
}

# hook name -> the kind of thing its register callback registers
_REGISTER_HOOKS = {
    "chopsticks_register_facts": "fact",
    "chopsticks_register_tasks": "task",
    "chopsticks_register_tunnels": "tunnel",
}
_PLURAL = {"fact": "facts", "task": "tasks", "tunnel": "tunnels"}
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*$")


class PluginError(ChopsticksError):
    """A plugin cannot be used as it is: a duplicate name, or a bad registration."""


class PluginWarning(UserWarning):
    """Emitted when a plugin fails to load or register; the other plugins still work."""


class UnknownNameError(AttributeError):
    """No installed plugin registered this fact, task or tunnel scheme."""


@dataclass
class Registration:
    """One fact, task or tunnel scheme, and the plugin that registered it."""

    kind: str  # 'fact', 'task' or 'tunnel'
    name: str
    obj: Callable[..., Any]
    plugin: "PluginInfo"
    metadata: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginInfo:
    """What ``chopsticks list-plugins`` shows about one plugin."""

    name: str
    distribution: Optional[str] = None
    version: Optional[str] = None
    module: Optional[str] = None
    status: str = "ok"  # 'ok', 'error' or 'disabled'
    message: Optional[str] = None  # the error, or why it is disabled
    facts: List[str] = field(default_factory=list)
    tasks: List[str] = field(default_factory=list)
    tunnels: List[str] = field(default_factory=list)
    builtin: bool = False

    def describe(self) -> str:
        """``'chopsticks-facts 0.1.0'``, or how the plugin was registered."""
        if self.distribution:
            return f"{self.distribution} {self.version}" if self.version else self.distribution
        return f"plugin {self.name!r} (registered in code)"

    def as_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": self.status,
            "message": self.message,
            "facts": list(self.facts),
            "tasks": list(self.tasks),
            "tunnels": list(self.tunnels),
            "builtin": self.builtin,
        }


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class PluginManager(pluggy.PluginManager):
    """pluggy's PluginManager for project ``chopsticks``, with registries.

    ``PluginManager()`` loads entry-point plugins on first use (honouring the
    environment variables above); ``PluginManager(autoload=False)`` loads none,
    for tests that :meth:`register` plugin objects themselves (see the
    ``chopsticks_plugin_manager`` fixture).  Either way the built-in tunnel
    schemes are registered.
    """

    def __init__(self, autoload: bool = True, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__("chopsticks")
        self.add_hookspecs(hookspecs)
        self._autoload = autoload
        self._environ = os.environ if environ is None else environ
        self._loaded = False
        self._infos: Dict[str, PluginInfo] = {}
        self._registries: Optional[Dict[str, Dict[str, Registration]]] = None
        self._conflicts: Dict[Tuple[str, str], str] = {}
        self._lock = threading.RLock()  # namespaces may be first used from several threads

    # -- loading -----------------------------------------------------------

    def plugin_packages(self) -> Set[str]:
        """Top-level packages of the plugins loaded so far: installed on the
        controller only, their code reaches hosts through the import hook."""
        return {info.module.partition(".")[0] for info in list(self._infos.values())
                if info.module and info.status == "ok" and not info.builtin}

    def load(self) -> None:
        """Register the built-in plugin and the entry-point plugins, once."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            if self.get_plugin("chopsticks") is None:
                self._register_builtin()
            if self._autoload:
                self._load_entry_points()

    def _register_builtin(self) -> None:
        # Imported here, not at the top: chopsticks.hosts (host strings and the
        # built-in tunnel schemes) imports this module for the registry.
        from chopsticks.hosts import CoreTunnels

        try:
            version = importlib_metadata.version("chopsticks")
        except importlib_metadata.PackageNotFoundError:
            version = None
        info = PluginInfo(
            name="chopsticks", distribution="chopsticks", version=version,
            module=CoreTunnels.__module__, builtin=True,
        )
        self._add(CoreTunnels(), info)

    def _load_entry_points(self) -> None:
        allow = self._environ.get(ALLOW_LIST_ENV)
        allowed = None if allow is None else {_canonical(n) for n in allow.split(",") if n.strip()}
        autoload_off = self._environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("", "0")
        seen_allowed = set()

        eps = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda ep: (_canonical(_dist_name(ep) or ""), ep.name)):
            dist = _dist_name(ep)
            info = PluginInfo(
                name=ep.name, distribution=dist, version=_dist_version(ep), module=ep.value,
            )
            clash = None
            if ep.name in self._infos:  # two distributions use one entry-point name
                other = self._infos[ep.name]
                info.name = f"{ep.name} ({dist})"  # listed beside the plugin that has the name
                clash = (f"the plugin name {ep.name!r} is already used by {other.describe()}; "
                         f"uninstall one of {other.distribution or other.name} and {dist}")
            names = {_canonical(ep.name)} | ({_canonical(dist)} if dist else set())
            if allowed is not None:
                if not names & allowed:
                    self._disable(info, f"not named in {ALLOW_LIST_ENV}={allow}")
                    continue
                seen_allowed |= names & allowed
            elif autoload_off:
                self._disable(info, f"{DISABLE_AUTOLOAD_ENV} is set")
                continue
            if clash:
                self._fail(info, clash)
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                self._fail(info, f"failed to load {ep.value}: {_exc_text(exc)}")
                continue
            try:
                self._add(plugin, info)
            except Exception as exc:
                self._fail(info, f"{ep.value} is not a valid plugin: {_exc_text(exc)}")

        if allowed is not None:
            for missing in sorted(allowed - seen_allowed):
                installed = ", ".join(sorted(self._infos)) or "none"
                _warn(f"{ALLOW_LIST_ENV} names {missing!r}, but no installed chopsticks plugin "
                      f"has that name (installed: {installed})")

    def _add(self, plugin: object, info: PluginInfo) -> None:
        if info.name in self._infos:
            raise ValueError(f"a plugin named {info.name!r} is already registered "
                             f"({self._infos[info.name].describe()})")
        self._infos[info.name] = info
        try:
            pluggy.PluginManager.register(self, plugin, name=info.name)
            self.check_pending()
        except Exception:
            del self._infos[info.name]
            if self.get_plugin(info.name) is not None:
                pluggy.PluginManager.unregister(self, name=info.name)
            raise
        self._registries = None

    def _disable(self, info: PluginInfo, why: str) -> None:
        info.status, info.message = "disabled", why
        self._infos[info.name] = info

    def _fail(self, info: PluginInfo, why: str, disabled: bool = True) -> None:
        info.status, info.message = "error", why
        self._infos[info.name] = info
        label = (f"chopsticks plugin {info.name!r} ({info.describe()})" if info.distribution
                 else f"chopsticks {info.describe()}")
        effect = "is disabled" if disabled else "is not fully usable"
        _warn(f"{label} {effect}: {why}. Other plugins are unaffected; "
              f"see `chopsticks list-plugins`.")

    # -- pluggy overrides: keep the registries in step ---------------------

    def register(self, plugin: object, name: Optional[str] = None) -> Optional[str]:
        """Register a plugin object (a module or any object with hookimpls).

        Its facts, tasks and tunnel schemes become available at once.  Errors
        in its hooks are reported like those of an installed plugin.
        """
        self.load()
        name = name or self.get_canonical_name(plugin)
        module = getattr(plugin, "__name__", None) or type(plugin).__module__
        self._add(plugin, PluginInfo(name=name, module=module))
        return name

    def unregister(self, plugin: Optional[object] = None, name: Optional[str] = None) -> Any:
        if name is None:
            name = self.get_name(plugin)
        result = super().unregister(plugin, name)
        if name is not None:
            self._infos.pop(name, None)
        self._registries = None
        return result

    # -- registries --------------------------------------------------------

    def plugins(self) -> List[PluginInfo]:
        """Every plugin seen: loaded, broken or disabled, built-in first."""
        self._collect()
        return sorted(self._infos.values(), key=lambda i: (not i.builtin, i.name))

    def registry(self, kind: str) -> Dict[str, Registration]:
        """Every ``kind`` (``'fact'``, ``'task'`` or ``'tunnel'``) registered, by name."""
        return self._collect()[kind]

    @property
    def facts(self) -> Dict[str, Registration]:
        return self._collect()["fact"]

    @property
    def tasks(self) -> Dict[str, Registration]:
        return self._collect()["task"]

    @property
    def tunnels(self) -> Dict[str, Registration]:
        return self._collect()["tunnel"]

    def _collect(self) -> Dict[str, Dict[str, Registration]]:
        self.load()
        registries = self._registries
        if registries is not None:
            return registries
        with self._lock:
            if self._registries is None:
                self._registries = self._collect_now()
            return self._registries

    def _collect_now(self) -> Dict[str, Dict[str, Registration]]:
        everything: List[Registration] = []
        for info in self._infos.values():
            if info.status == "disabled" or (info.status == "error" and self.get_plugin(info.name) is None):
                continue  # disabled, or failed to load: nothing to call
            info.status, info.message = "ok", None
            staged: List[Registration] = []
            try:
                for hookimpl_, kind in self._hookimpls_of(info.name):
                    register = _Registrar(kind, info, staged)
                    hookimpl_.function(**({"register": register} if "register" in hookimpl_.argnames else {}))
            except Exception as exc:
                self._fail(info, _exc_text(exc) if isinstance(exc, PluginError)
                           else f"its hook raised {_exc_text(exc)}")
                continue
            everything.extend(staged)
        registries = self._resolve_duplicates(everything)
        for info in self._infos.values():
            for kind in _PLURAL:
                setattr(info, _PLURAL[kind], sorted(
                    name for name, reg in registries[kind].items() if reg.plugin is info))
        return registries

    def _resolve_duplicates(self, registrations: List[Registration]) -> Dict[str, Dict[str, Registration]]:
        """Registries of the names exactly one plugin registered.

        A name two plugins registered is refused for both (whichever loads
        first must not silently win), unless one is chopsticks itself, whose
        own is kept; every plugin involved is marked ``error``, naming the
        other distribution.
        """
        by_name: Dict[Tuple[str, str], List[Registration]] = {}
        for reg in registrations:
            by_name.setdefault((reg.kind, reg.name), []).append(reg)
        registries: Dict[str, Dict[str, Registration]] = {kind: {} for kind in _PLURAL}
        problems: Dict[str, List[str]] = {}
        for (kind, name), regs in by_name.items():
            if len(regs) == 1:
                registries[kind][name] = regs[0]
                continue
            owners = " and ".join(reg.plugin.describe() for reg in regs)
            builtin = [reg for reg in regs if reg.plugin.builtin]
            if builtin:
                registries[kind][name] = builtin[0]
                outcome = "chopsticks' own is used"
            else:
                outcome = (f"neither is used: uninstall one, or choose with "
                           f"{ALLOW_LIST_ENV}=... (see `chopsticks list-plugins`)")
            for reg in regs:
                if not reg.plugin.builtin:
                    problems.setdefault(reg.plugin.name, []).append(
                        f"the {kind} {name!r} is registered by both {owners}; {outcome}")
        for plugin_name, messages in problems.items():
            self._fail(self._infos[plugin_name], "; ".join(messages), disabled=False)
        self._conflicts = {(kind, name): f"The {kind} {name!r} is registered by both "
                           + " and ".join(reg.plugin.describe() for reg in regs) + "; neither is used."
                           for (kind, name), regs in by_name.items()
                           if len(regs) > 1 and name not in registries[kind]}
        return registries

    def _hookimpls_of(self, name: str) -> Iterable[Tuple[Any, str]]:
        plugin = self.get_plugin(name)
        for hook_name, kind in _REGISTER_HOOKS.items():
            for impl in getattr(self.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin:
                    yield impl, kind

    def lookup(self, kind: str, name: str) -> Callable[..., Any]:
        """The fact, task or tunnel factory registered as ``name``.

        Raises :class:`UnknownNameError` saying which plugins are installed
        and, for a well-known name, which distribution provides it.
        """
        registry = self._collect()[kind]
        if name in registry:
            return registry[name].obj
        raise UnknownNameError(self._unknown_message(kind, name))

    def _unknown_message(self, kind: str, name: str) -> str:
        registry = self._collect()[kind]
        if (kind, name) in self._conflicts:
            return (f"{self._conflicts[kind, name]} Uninstall one, or choose with "
                    f"{ALLOW_LIST_ENV}=... (see `chopsticks list-plugins`).")
        lines = [f"No chopsticks {kind} is named {name!r}."]
        close = difflib.get_close_matches(name, list(registry), n=3)
        if close:
            lines.append("Did you mean " + " or ".join(repr(c) for c in close) + "?")
        provider = KNOWN_PROVIDERS.get(kind, {}).get(name)
        if provider:
            info = next((i for i in self._infos.values()
                         if i.distribution and _canonical(i.distribution) == _canonical(provider)), None)
            if info is None:
                lines.append(f"It is provided by {provider}, which is not installed: "
                             f"pip install {provider}")
            else:
                lines.append(f"It is provided by {provider}, which is installed but "
                             f"{info.status}: {info.message}")
        if registry:
            lines.append(f"Available {_PLURAL[kind]}: {', '.join(sorted(registry))}.")
        installed = [f"{i.name} ({i.describe()}, {i.status})" for i in self.plugins()]
        lines.append("Installed plugins: " + ", ".join(installed) + ".")
        return " ".join(lines)


class _Registrar:
    """The ``register`` callback handed to one plugin's hook."""

    def __init__(self, kind: str, info: PluginInfo, staged: List[Registration]) -> None:
        self.kind, self.info, self.staged = kind, info, staged

    def __call__(self, obj: Any, factory: Any = None, name: Optional[str] = None, **metadata: Any) -> None:
        if self.kind == "tunnel":
            name, obj = self._check_tunnel(obj, factory)
        else:
            if factory is not None:  # register(func, 'name') positionally
                name = factory
            name = self._check_function(obj, name)
            metadata.setdefault("description", _first_line(obj.__doc__))
        for reg in self.staged:
            if reg.kind == self.kind and reg.name == name:
                raise PluginError(f"{self.info.describe()} registers the {self.kind} {name!r} twice")
        self.staged.append(Registration(self.kind, name, obj, self.info, metadata))

    def _check_function(self, func: Any, name: Optional[str]) -> str:
        what = f"{self.info.describe()} registers {func!r} as a {self.kind}"
        if not callable(func):
            raise PluginError(f"{what}, but it is not callable")
        name = name or getattr(func, "__name__", None)
        if not name or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise PluginError(f"{what} named {name!r}; a name must be a public Python identifier")
        module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
        if _resolve(module, qualname) is not func:
            raise PluginError(
                f"{what}, but the host could not import it as {module}.{qualname}: register a "
                f"module-level function of an importable module (the host imports it by name)")
        if self.kind == "task":
            params = inspect.signature(func).parameters.values()
            if not any(p.name == "check" or p.kind is p.VAR_KEYWORD for p in params):
                raise PluginError(f"{what}, but it takes no 'check' keyword argument (check mode)")
        return name

    def _check_tunnel(self, scheme: Any, factory: Any) -> Tuple[str, Any]:
        if not isinstance(scheme, str) or not _SCHEME_RE.match(scheme):
            raise PluginError(f"{self.info.describe()} registers the tunnel scheme {scheme!r}; "
                              f"a scheme is lower-case letters, digits, '+', '-' or '.'")
        if not callable(factory):
            raise PluginError(f"{self.info.describe()} registers the tunnel scheme {scheme!r} "
                              f"with a factory that is not callable: {factory!r}")
        return scheme, factory


def _resolve(module: Optional[str], qualname: str) -> Any:
    if not module or module == "__main__" or "<" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _first_line(doc: Optional[str]) -> str:
    return (inspect.cleandoc(doc).splitlines() or [""])[0] if doc else ""


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _warn(message: str) -> None:
    warnings.warn(PluginWarning(message), stacklevel=3)


def _dist_name(ep: Any) -> Optional[str]:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def _dist_version(ep: Any) -> Optional[str]:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else None


# -- the process-wide plugin manager --------------------------------------

_current: Optional[PluginManager] = None


def get_plugin_manager() -> PluginManager:
    """The plugin manager everything uses; created (not loaded) on first call."""
    global _current
    if _current is None:
        _current = PluginManager()
    return _current


def set_plugin_manager(pm: Optional[PluginManager]) -> Optional[PluginManager]:
    """Make ``pm`` the current plugin manager; returns the previous one.

    ``None`` means "a fresh autoloading one on next use".
    """
    global _current
    previous, _current = _current, pm
    return previous


def __getattr__(name: str) -> Any:
    # Host strings moved to chopsticks.hosts; these names stay importable from
    # here (the README documented chopsticks.plugins.tunnel_from_url).  Imported
    # here, not at the top: chopsticks.hosts imports this module.
    if name in ("tunnel_from_url", "parse_value", "CoreTunnels"):
        from chopsticks import hosts

        return getattr(hosts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

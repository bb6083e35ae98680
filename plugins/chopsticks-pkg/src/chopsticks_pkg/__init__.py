"""chopsticks-pkg: idempotent package tasks over the host's package manager.

``install``, ``remove``, ``latest`` and ``update_cache`` run on the host
(through chopsticks' import hook: standard library only, Python 3.6+) over
apt, dnf, yum, zypper, apk, pacman or brew.  Each returns a plain dict::

    {'changed': bool, 'check': bool, 'manager': 'apt',
     'installed': {name: version}, 'upgraded': {name: {'from': v1, 'to': v2}},
     'removed': {name: version}}

``changed`` and the three lists come from comparing the installed packages
before and after the change (dependencies included), never from the
manager's messages; with ``check=True`` nothing changes and the result is
the plan, computed from the installed packages and the manager's candidate
versions.  Packages are ``'name'`` or ``'name=version'`` (a pin, where the
manager supports one); a task takes several, or lists of them.  ``upgraded``
lists every version change, a pin to an older version (a downgrade) included.

A package of another architecture than the host's is named as its manager
names it, ``'libc6:i386'`` (apt) or ``'glibc.i686'`` (dnf, yum, zypper), and
so it is reported; the host's own architecture may be given or left out
(``'libc6:amd64'`` is ``'libc6'`` on amd64), and is left out in results.
"""
from chopsticks_pkg.backends import BACKENDS, PackageError, get_backend

__version__ = "2.0.0"
__all__ = ["install", "remove", "latest", "update_cache", "PackageError", "BACKENDS", "TASKS"]


def _flatten(packages):
    names = []
    for item in packages:
        if isinstance(item, str):
            names.extend(item.replace(",", " ").split())
        else:
            names.extend(_flatten(item))
    return names


def _specs(packages):
    """``[(name, version or None)]`` from ``'name'`` / ``'name=version'`` items."""
    specs = []
    for spec in _flatten(packages):
        name, _, version = spec.partition("=")
        specs.append((name, version or None))
    if not specs:
        raise PackageError("no package named: pass one or more package names")
    return specs


def _names(packages, task):
    specs = _specs(packages)
    pinned = ["%s=%s" % s for s in specs if s[1]]
    if pinned:
        raise PackageError("%s takes package names without versions, not %s" % (task, ", ".join(pinned)))
    return [name for name, _ in specs]


def _unique(names):
    seen = set()
    return [n for n in names if not (n in seen or seen.add(n))]


def _result(backend, check, before, after):
    installed = {n: v for n, v in after.items() if n not in before}
    removed = {n: v for n, v in before.items() if n not in after}
    upgraded = {n: {"from": before[n], "to": v} for n, v in after.items()
                if n in before and before[n] != v}
    return {"changed": bool(installed or removed or upgraded), "check": check,
            "manager": backend.name, "installed": installed, "upgraded": upgraded,
            "removed": removed}


def _unknown(backend, names):
    return PackageError("%s knows no package named %s (is the cache up to date? "
                        "see update_cache)" % (backend.name, ", ".join(repr(n) for n in names)))


def install(*packages, check=False, manager=None):
    """Make sure packages are installed: any version, or the pinned ``'name=version'``.

    Already-installed packages (at the pinned version, if pinned) are left
    alone; nothing is upgraded that need not be (see :func:`latest`).
    ``manager`` forces a backend (``'apt'``, ``'dnf'``, ...); by default the
    host's own.  In check mode, an unknown package fails just as the real
    run would.
    """
    backend = get_backend(manager)
    specs = _specs(packages)
    backend.specs(specs)  # refuses pins the manager cannot honour, before anything runs
    specs = _unique([(backend.canonical(n), v) for n, v in specs])
    before = backend.installed()
    todo = [(n, v) for n, v in specs if n not in before or (
        v is not None and not any(backend.pin_matches(v, have) for have in before[n].split(", ")))]
    if not todo:
        return _result(backend, check, before, before)
    if check:
        return _result(backend, True, before, _install_plan(backend, before, todo))
    backend.execute(backend.install_argv(todo))
    return _result(backend, False, before, backend.installed())


def _install_plan(backend, before, todo):
    """The installed packages after installing ``todo``, or the error the real run would meet."""
    candidates = backend.candidates([n for n, v in todo if v is None])
    offered = backend.versions([n for n, v in todo if v is not None])
    after = dict(before)
    unknown, not_offered = [], []
    for name, pin in todo:
        if pin is None:
            after[name] = candidates.get(name)
        else:
            matching = [v for v in offered.get(name, ()) if backend.pin_matches(pin, v)]
            after[name] = matching[-1] if matching else None
            if offered.get(name) and not matching:
                not_offered.append("%s=%s (it has %s)" % (name, pin, ", ".join(_unique(offered[name]))))
        if not after[name] and not offered.get(name):
            unknown.append(name)
    if unknown:
        raise _unknown(backend, unknown)
    if not_offered:
        raise PackageError("%s offers no such version: %s; is the cache up to date? see update_cache"
                           % (backend.name, "; ".join(not_offered)))
    return after


def remove(*packages, check=False, manager=None):
    """Make sure packages are not installed.

    What the manager removes with them (packages that depend on them) is
    listed in ``removed`` too.  Names that are not installed are fine.
    """
    backend = get_backend(manager)
    names = _unique([backend.canonical(n) for n in _names(packages, "remove")])
    before = backend.installed()
    present = [n for n in names if n in before]
    if not present:
        return _result(backend, check, before, before)
    if check:
        return _result(backend, True, before, {n: v for n, v in before.items() if n not in present})
    backend.execute(backend.remove_argv(present))
    return _result(backend, False, before, backend.installed())


def latest(*packages, check=False, manager=None):
    """Make sure packages are installed at the newest version the manager offers.

    Uses the package metadata as it is: run :func:`update_cache` first to
    see new releases.
    """
    backend = get_backend(manager)
    names = _unique([backend.canonical(n) for n in _names(packages, "latest")])
    before = backend.installed()
    candidates = backend.candidates(names)
    unknown = [n for n in names if not candidates.get(n) and n not in before]
    if unknown:
        raise _unknown(backend, unknown)
    missing = [n for n in names if n not in before]
    outdated = [n for n in names if n in before and candidates.get(n)
                and candidates[n] not in before[n].split(", ")]
    if check:
        after = dict(before)
        after.update((n, candidates[n]) for n in missing + outdated)
        return _result(backend, True, before, after)
    if missing:
        backend.execute(backend.install_argv([(n, None) for n in missing]))
    if outdated:
        backend.execute(backend.upgrade_argv(outdated))
    return _result(backend, False, before, backend.installed())


def update_cache(max_age=0, check=False, manager=None):
    """Refresh the package metadata (``apt-get update``, ``dnf makecache``, ...)
    unless it was refreshed less than ``max_age`` seconds ago.

    Returns ``{'changed', 'check', 'manager', 'updated': bool, 'age': seconds
    since the previous refresh or None}``: ``updated`` says whether the
    refresh ran, ``changed`` whether it brought new metadata.  In check
    mode, ``changed`` says whether it would run.
    """
    backend = get_backend(manager)
    age = backend.cache_age()
    result = {"changed": False, "check": check, "manager": backend.name,
              "updated": False, "age": age}
    if age is not None and age < max_age:
        return result
    if check:
        result["changed"] = True
        return result
    before = backend.cache_fingerprint()
    backend.execute(backend.refresh_argv())
    backend.refreshed()
    result["updated"] = True
    result["changed"] = backend.cache_fingerprint() != before
    return result


#: The tasks this package registers, by name.
TASKS = {task.__name__: task for task in (install, remove, latest, update_cache)}

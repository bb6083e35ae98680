"""The controller side of the remote import hook.

When the remote cannot import a module itself, its agent asks us.  We serve
pure-Python modules and packages found on our own ``sys.path`` (directories,
zip files, namespace packages), never anything else: the remote names a
module, not a file, and data files are only read from inside the directory
of a package this connection was served.

What a host may have (``ServePolicy``, documented in the README's security
section): by default any pure-Python module on ``sys.path`` by name, and as
package data only the files a package's installed distribution ships (its
RECORD) or a zip archive holds; never a file or directory whose name starts
with a dot.  ``CHOPSTICKS_SERVE=pkg1,pkg2`` (or ``serve=``) limits serving to
those top-level packages, whose every other file then counts as data;
``CHOPSTICKS_SERVE=none`` serves nothing but chopsticks and its plugins;
``*`` among the names keeps the default for all other modules.

Round trips dominate on a real network, so a reply carries the requested
module *and* its static import closure (the modules its top-level code
imports, read from its bytecode, recursively), compressed together.  It
also says which of the names those modules import anywhere (in functions,
under ``try: ... except ImportError``, behind ``sys.platform`` tests) we
cannot serve, and, once, which top-level names we never serve (our stdlib):
the host then never asks for what nobody has.  Its own finders come first,
so a negative answer never hides a module the host has itself.
"""
import collections
import os
import sys
import threading
import time
import zipimport
import zlib

from . import codec
from .modfind import (MAGIC, STDLIB_NAMES, Refused, find_spec, inside, is_stdlib, module_info,
                      file_mtime, policy_listing, search_roots)
from .servepolicy import ENV_SERVE, ServePolicy, dotted, plugin_packages, shipped_by

# Stop adding preloaded modules to one reply past this much source (and as
# much again of bytecode): the real-packages bench set is 2.4 MB of source.
CLOSURE_BYTES = 6 << 20
# Modules that a package's functions import from the package go along while
# they add up to this much source: lazy by design, often never imported.
# Not chopsticks' own: what its host halves import in functions is their
# controller half (shell.run_group's chopsticks.group brought the whole core,
# 720 KB of the 1 MB a deployment's module had sent ahead to every host).
LAZY_BYTES = 256 << 10
# Data files a package's code names (certifi's cacert.pem, read when requests
# is imported) go along while they add up to this much: a data request is a
# round trip of its own.
DATA_BYTES = 512 << 10
FAST_COMPRESS_BYTES = 1 << 20  # see _packed
CODE_SUFFIXES = ('.py', '.pyc', '.pyi', '.so', '.pyd', 'py.typed')
# A 'closure' request (a relay asking for a module and everything it imports)
# cost 90 ms of encoding and compressing each time: replies are kept, at most
# this many and this many bytes, and re-checked against the files' mtimes
# at most once a second.
CLOSURE_CACHE_ENTRIES = 64
CLOSURE_CACHE_BYTES = 32 << 20


# What CPython's own stdlib (3.6 to 3.13) imports for other platforms, under
# try or a platform test, that is not in sys.stdlib_module_names: copy.py and
# pickle.py's "from org.python.core import PyStringMap" (Jython) cost every
# Linux host up to 3.11 a round trip.
OTHER_PLATFORMS = ('org', 'java', 'vms_lib', '_winreg', '_wmi', 'win32evtlog',
                   'win32evtlogutil', 'win32wnet', 'netbios', 'Carbon', '_ios_support')


def _not_a_submodule(name, infos):
    """Whether ``pkg.name`` (of ``from pkg import name``) is surely no module,
    judged from pkg's ModuleInfo in ``infos`` without looking on disk (which
    cost half of serving the real-packages bench set: 10,000 find_spec calls):
    pkg is a plain module, or a regular package with no file or directory so
    named."""
    parent_name, _, attribute = name.rpartition('.')
    parent = infos.get(parent_name, False)
    if parent is False or parent is None:
        return False  # not looked at yet, or not ours: ask the usual way
    if parent.package_dir is None:
        return True
    listing = parent.listing
    if listing is None or parent.kind == 'namespace':
        return False
    prefix = attribute + '.'
    return listing.get(attribute) != 'dir' and not any(
        rel.startswith(prefix) and '/' not in rel for rel in listing)


def _submodule_only(name, infos):
    """Whether ``pkg.name`` (of ``from pkg import name``) can only be a
    submodule: pkg is a package that does not define ``name`` (it does not
    spell it, nor import ``*``, nor have a module ``__getattr__``)."""
    parent_name, _, attribute = name.rpartition('.')
    parent = infos.get(parent_name)
    if parent is None or parent.package_dir is None:
        return False  # not a package: nobody looks for a submodule
    source = parent.source
    return attribute.encode() not in source and b'import *' not in source \
        and b'__getattr__' not in source


def _absent(top_level_name):
    """Whether we have no module ``top_level_name`` at all (nor our stdlib)."""
    return not is_stdlib(top_level_name) and find_spec(top_level_name) is None


def host_lacks(fullname, origin):
    """Whether a host most likely lacks module ``fullname`` (found at
    ``origin`` here): the user's own code, which is not installed, and
    chopsticks and its plugins, which hosts never install.  A library
    installed here may well be installed there too: sending it unasked could
    cost more than the round trip it saves."""
    top = fullname.partition('.')[0]
    if top == 'chopsticks' or top in plugin_packages():
        return True
    parts = os.path.realpath(origin).split(os.sep)
    return 'site-packages' not in parts and 'dist-packages' not in parts


def _packed(reply):
    """A reply to an IMPORT request (or modules sent ahead) as it travels.

    A big one is compressed fast: the real-packages bench set (9.5 MB of
    source and bytecode) took 0.51 s at level 1 against 1.84 s at level 6
    on a loaded machine, for 15% more bytes (3.3 MB against 2.9)."""
    raw = codec.encode(reply)
    return zlib.compress(raw, 6 if len(raw) < FAST_COMPRESS_BYTES else 1)


# --- serving one connection --------------------------------------------------------

class _ClosureReply(object):
    __slots__ = ('packed', 'files', 'names', 'package_dirs', 'checked', 'told_missing',
                 'data_sent', 'modules')

    def current(self):
        return all(file_mtime(origin) == mtime for origin, mtime in self.files)

    def same_modules(self):
        """Whether each module of the reply is still found where it was, unchanged
        (sys.path may have changed: another file of the same name would be served)."""
        for name, origin, mtime in self.modules:
            try:
                info = module_info(name)
            except Refused:
                return False
            if info is None or info.origin != origin or file_mtime(origin) != mtime:
                return False
        return self.current()


_closures = {}  # (name, with bytecode, policy) -> _ClosureReply, oldest first
_closures_lock = threading.Lock()
_preload_locks = {}  # a preload's cache key -> the lock of whoever packs it


class ModuleServer(object):
    """Answers one remote's import requests; remembers what it already sent.

    ``serve``: which packages this host may have (see ServePolicy); None
    reads ``CHOPSTICKS_SERVE``."""

    def __init__(self, serve=None):
        self.sent = set()
        self.package_dirs = {}  # real package dir -> (loader, top-level name), for data
        self.lock = threading.Lock()
        self.remote_magic = None  # the remote's bytecode magic, from its HELLO
        self.policy = ServePolicy(serve)
        self.told_missing = set()  # names this remote was told we do not have
        self.data_sent = set()  # data files sent ahead (see _named_data)
        self.stdlib_sent = False

    def handle(self, query):
        """Answer an IMPORT request; the reply is compressed codec bytes."""
        try:
            kind, arg = query
            if not isinstance(arg, str):
                raise Refused('bad request')
            if kind == 'module':
                reply = self.serve_module(arg)
            elif kind == 'closure':
                return self.closure_reply(arg)
            elif kind == 'data':
                reply = {'data': self.serve_data(arg)}
            else:
                raise Refused('unknown request %r' % (kind,))
        except Refused as e:
            reply = {'error': str(e), 'errors': {arg: str(e)} if kind == 'module' else {}}
        except (ValueError, TypeError):
            reply = {'error': 'malformed import request'}
        except OSError as e:
            reply = {'error': '%s: %s' % (type(e).__name__, e)}
        return _packed(reply)

    def closure_reply(self, fullname):
        """A 'closure' reply, packed, from the process-wide cache when the
        same module set was packed before and its files did not change."""
        key = (fullname, self.remote_magic == MAGIC, self.policy.key)
        now = time.monotonic()
        with _closures_lock:
            cached = _closures.pop(key, None)
        if cached is not None and (now - cached.checked < 1.0 or cached.current()):
            if now - cached.checked >= 1.0:
                cached.checked = now
        else:
            reply = self.serve_module(fullname, resend=True)
            cached = _ClosureReply()
            cached.packed = _packed(reply)
            cached.names = set(reply.get('modules', ()))
            cached.files = [(entry[1], file_mtime(entry[1]))
                            for entry in reply.get('modules', {}).values() if entry[1]]
            cached.package_dirs = {}
            for name in cached.names:
                info = module_info(name)
                if info is not None and info.package_dir is not None \
                        and info.kind != 'namespace':
                    cached.package_dirs[os.path.realpath(info.package_dir)] = (
                        info.loader, name.partition('.')[0])
            cached.checked = now
        with self.lock:
            self.sent.update(cached.names)
            self.package_dirs.update(cached.package_dirs)
        self._keep(key, cached)
        return cached.packed

    def serve_module(self, fullname, resend=False):
        """The module and its import closure, leaving out what this remote
        already has (unless ``resend``: a relay asking on behalf of others).

        The closure: what the module imports at its top level, recursively,
        except through a module that cannot import (it imports, outside any
        ``try``, a name we lack); then, while LAZY_BYTES last, what those
        modules' functions import from their own package.  The user's own
        code (see host_lacks) is about to run on the host: what its functions
        import is part of its closure.  ``missing`` names what any of them
        imports, anywhere, that we do not have, so that the host never asks.
        """
        modules = {}
        errors = {}
        missing = []
        if not self.policy.allows_module(fullname):
            raise Refused(self.policy.why_not(fullname))
        with self.lock:
            root = module_info(fullname)
            if root is None:
                return self._once({'missing': [fullname]}, resend)
            eager = collections.deque([root.name])
            lazy = collections.deque()
            if root.kind == 'source' and host_lacks(root.name, root.origin):
                eager.extend(root.lazy_imports)
            probe = []
            served = []
            attributes = set()
            infos = {}  # name -> ModuleInfo or None, as found in this walk
            total = lazy_total = 0
            seen = set()
            for queue, is_lazy in ((eager, False), (lazy, True)):
                while queue:
                    name = queue.popleft()
                    if name in seen:
                        continue
                    seen.add(name)
                    if not self.policy.allows_module(name):
                        continue  # not this host's: it imports its own, or asks and is told
                    if name in attributes and _not_a_submodule(name, infos):
                        if infos[name.rpartition('.')[0]].package_dir is not None:
                            missing.append(name)  # told if it cannot be an attribute either
                        continue  # a class or function of a module already here
                    try:
                        info = module_info(name) if name != root.name else root
                    except Refused as e:
                        errors[name] = str(e)
                        continue
                    infos[name] = info
                    if info is None:
                        if resend or name not in self.told_missing:
                            missing.append(name)
                        continue
                    if resend or name not in self.sent:
                        size = len(info.source)
                        if name != root.name and (total + size > CLOSURE_BYTES or (
                                is_lazy and lazy_total + size > LAZY_BYTES)):
                            continue
                        modules[name] = self._entry(info)
                        served.append(info)
                        self.sent.add(name)
                        total += size
                        lazy_total += size if is_lazy else 0
                        # Any directory on sys.path imports as a namespace package:
                        # only a regular package (one with __init__.py) opens its data files.
                        if info.package_dir is not None and info.kind != 'namespace':
                            self.package_dirs[os.path.realpath(info.package_dir)] = (
                                info.loader, name.partition('.')[0])
                    attributes.update(info.attributes)
                    absent = [n for n in info.required if n not in seen and _absent(n)]
                    if absent:
                        # It cannot import anywhere (urllib3.contrib.pyopenssl without
                        # OpenSSL): what else it imports would be sent for nothing.
                        missing.extend(absent)
                        seen.update(absent)
                        continue
                    top = name.partition('.')[0]
                    if not is_lazy:
                        queue.extend(n for n in info.imports if n not in seen)
                        for n in info.lazy_imports:
                            if n.partition('.')[0] == top and top != 'chopsticks':
                                lazy.append(n)  # its own package's: likely used with it
                            elif n not in probe:
                                probe.append(n)  # another's: only said to be missing
                        continue
                    for n in info.imports:  # a lazily imported module's closure, in its package
                        if n.partition('.')[0] == top:
                            queue.append(n)
                        elif n not in probe:
                            probe.append(n)
            data = self._named_data(served)
            for name in probe:
                if name in seen or not (resend or name not in self.told_missing) or \
                        not self.policy.allows_module(name) or (
                        name in attributes and _not_a_submodule(name, infos)):
                    continue
                try:
                    if module_info(name) is None:
                        missing.append(name)
                except Refused as e:
                    errors[name] = str(e)
            missing = [name for name in dict.fromkeys(missing)
                       if (name not in attributes or _submodule_only(name, infos))
                       and not is_stdlib(name) and (resend or name not in self.told_missing)]
            self.told_missing.update(missing)
        if fullname not in modules and fullname in self.sent:
            # Asked again (after invalidate_caches, or by a second finder): resend.
            modules[fullname] = self._entry(root)
        reply = {'modules': modules, 'errors': errors, 'missing': missing}
        if data:
            reply['data'] = data
        return self._once(reply, resend)

    def _named_data(self, served):
        """{path: bytes} of the data files in the packages of ``served`` whose
        names their modules' sources spell out, up to DATA_BYTES."""
        data = {}
        total = 0
        packages = {info.name: info for info in served if info.listing}
        for info in served:
            package = packages.get(info.name if info.package_dir else info.name.rpartition('.')[0])
            if package is None:
                continue
            for rel, kind in package.listing.items():
                if kind != 'file' or rel.endswith(CODE_SUFFIXES) or \
                        rel.rpartition('/')[2].encode() not in info.source:
                    continue
                path = package.package_dir + '/' + rel
                if path in data or path in self.data_sent:
                    continue
                try:
                    size = os.path.getsize(path)
                    if total + size > DATA_BYTES:
                        continue
                    data[path] = self.serve_data(path)
                except (OSError, Refused):
                    continue
                total += size
                self.data_sent.add(path)
        return data

    def _once(self, reply, resend=False):
        """Add to a reply what a remote needs once: the top-level names we
        never serve, and those of OTHER_PLATFORMS we lack.  A relay
        (``resend``) gets them each time: it passes each reply on to
        whichever host asks that question first."""
        if resend or not self.stdlib_sent:
            self.stdlib_sent = True
            reply['stdlib'] = sorted(STDLIB_NAMES)
            reply['missing'] = list(reply.get('missing', ())) + [
                name for name in OTHER_PLATFORMS if _absent(name)]
        return reply

    def _entry(self, info):
        """``info.entry`` with the package listing this host's policy allows."""
        entry = info.entry(self.remote_magic == MAGIC)
        if info.listing is None:
            return entry
        listing = info.listings.get(self.policy.key)
        if listing is None:
            listing = info.listings[self.policy.key] = policy_listing(
                info.listing, info.package_dir, info.name.partition('.')[0],
                isinstance(info.loader, zipimport.zipimporter), self.policy)
        return entry[:4] + (listing,) + entry[5:]

    def preload(self, fullname):
        """What to send ahead of a call into module ``fullname``, compressed
        like an IMPORT reply: the module and its import closure, when a host
        most likely lacks it (see host_lacks) and it was not sent yet; else
        None.  The agent then imports it without asking: one round trip
        less for the first call into it."""
        try:
            info = module_info(fullname)
        except Refused:
            return None  # the agent asks, and learns why
        if info is None or info.kind != 'source' or fullname in self.sent \
                or not self.policy.allows_module(fullname) \
                or not host_lacks(fullname, info.origin):
            return None
        return self._preload_reply(fullname)

    def _preload_reply(self, fullname):
        """The packed reply of ``preload``, from the process-wide cache when a
        connection in the same state (most often: nothing sent yet) had the
        same module sent ahead and its files did not change since.  Packing
        the 1 MB closure of a deployment's module took 28 ms a host: 0.45 s
        of CPU for 16 hosts connecting together."""
        # Served by a copy, so that what the reply adds to a connection's
        # state is exactly the difference, whatever else this one serves.
        scratch = self._copy()
        base = (set(scratch.sent), set(scratch.told_missing), set(scratch.data_sent),
                set(scratch.package_dirs))
        key = ('preload', fullname, scratch.remote_magic == MAGIC, scratch.policy.key,
               scratch.stdlib_sent) + tuple(frozenset(part) for part in base)
        with _closures_lock:
            # Connections that open together wait for the first to pack it.
            key_lock = _preload_locks.setdefault(key, threading.Lock())
        with key_lock:
            cached = self._preload_cached(key, scratch, fullname)
        with _closures_lock:
            _preload_locks.pop(key, None)
        with self.lock:
            self.sent.update(cached.names)
            self.package_dirs.update(cached.package_dirs)
            self.told_missing.update(cached.told_missing)
            self.data_sent.update(cached.data_sent)
            self.stdlib_sent = True
        return cached.packed

    def _preload_cached(self, key, scratch, fullname):
        base = key[-4:]
        now = time.monotonic()
        with _closures_lock:
            cached = _closures.pop(key, None)
        if cached is None or not cached.same_modules():
            reply = scratch.serve_module(fullname)
            cached = _ClosureReply()
            cached.packed = _packed(reply)
            cached.names = scratch.sent - base[0]
            cached.told_missing = scratch.told_missing - base[1]
            cached.data_sent = scratch.data_sent - base[2]
            cached.package_dirs = {d: v for d, v in scratch.package_dirs.items()
                                   if d not in base[3]}
            cached.modules = [(name, entry[1], file_mtime(entry[1]))
                              for name, entry in reply.get('modules', {}).items()]
            cached.files = [(path, file_mtime(path)) for path in reply.get('data', ())]
            cached.checked = now
        self._keep(key, cached)
        return cached

    def _copy(self):
        """A ModuleServer in this one's state, that changing leaves this one alone."""
        with self.lock:
            copy = type(self).__new__(type(self))
            copy.__dict__.update(self.__dict__)
            copy.lock = threading.Lock()
            for name in ('sent', 'told_missing', 'data_sent', 'package_dirs'):
                setattr(copy, name, type(getattr(self, name))(getattr(self, name)))
        return copy

    @staticmethod
    def _keep(key, cached):
        with _closures_lock:
            _closures[key] = cached  # newest last
            while len(_closures) > CLOSURE_CACHE_ENTRIES or \
                    sum(len(c.packed) for c in _closures.values()) > CLOSURE_CACHE_BYTES:
                del _closures[next(iter(_closures))]

    def serve_data(self, path):
        """A data file from inside a package this remote was served."""
        if '\0' in path:
            raise Refused('bad path')
        for package_dir, (loader, top) in list(self.package_dirs.items()):
            if isinstance(loader, zipimport.zipimporter):
                norm = os.path.normpath(path)
                if inside(norm, [package_dir]):
                    if dotted(os.path.relpath(norm, package_dir)):
                        raise Refused('%s: files whose names start with a dot are not served'
                                      % path)
                    return loader.get_data(norm)
                continue
            real = os.path.realpath(path)
            if inside(real, [package_dir]) and inside(real, search_roots()):
                if dotted(os.path.relpath(real, package_dir)):
                    raise Refused('%s: files whose names start with a dot are not served' % path)
                if not os.path.isfile(real):
                    raise Refused('%s is not a file' % path)
                if not self.policy.allows_data(top, real, False):
                    raise Refused(
                        '%s is not package data: %s (to share all of a package\'s files with '
                        'hosts, name it in %s or serve=)'
                        % (path, 'its distribution does not ship it' if shipped_by(top) is not None
                           else '%s is not installed as a distribution' % top, ENV_SERVE))
                with open(real, 'rb') as f:
                    return f.read()
        raise Refused('%s is not inside a package served to this host' % path)


class ForwardingModuleServer(object):
    """On a relay host: serves the hosts behind it by asking the controller.

    Replies are cached here, so a module goes over the controller's link once
    however many hosts behind the relay import it.
    """

    cache = {}  # query -> decoded reply, shared by every connection of this relay
    cache_lock = threading.Lock()

    def __init__(self, agent):
        self.agent = agent
        self.sent = set()
        self.remote_magic = None

    def handle(self, query):
        try:
            kind, arg = query
        except (TypeError, ValueError):
            return _packed({'error': 'malformed import request'})
        upstream = ('closure', arg) if kind == 'module' else (kind, arg)
        with self.cache_lock:
            reply = self.cache.get(upstream)
        if reply is None:
            try:
                reply = self.agent.request(upstream)
            except ImportError as e:
                reply = {'error': str(e)}
            if kind in ('module', 'data') and 'error' not in reply:
                with self.cache_lock:
                    self.cache[upstream] = reply
        if kind == 'module' and 'modules' in reply:
            modules = {name: entry for name, entry in reply['modules'].items()
                       if name not in self.sent or name == arg}
            self.sent.update(modules)
            reply = dict(reply, modules=modules)
        return _packed(reply)


def server_for_this_process(serve=None):
    """The import server for a new connection: a relay forwards to its
    controller (whose policy then decides).  ``serve``: see ServePolicy."""
    agent = getattr(sys.modules.get('_chopsticks_agent'), 'agent', None)
    if agent is not None:
        return ForwardingModuleServer(agent)
    return ModuleServer(serve)

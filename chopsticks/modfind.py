"""Finding the controller's modules, and what each one is.

The import server (chopsticks.modserver) asks here: which names are the
standard library, where a module lives on the controller's ``sys.path``,
and its :class:`ModuleInfo` (source, bytecode, what it imports, its data
files as a serving policy may list them), cached by file modification time.
"""
import importlib.machinery
import importlib.util
import marshal
import os
import re
import sys
import sysconfig
import threading
import zipimport

from . import modscan
from .modscan import MODULE_NAME
from .servepolicy import dotted

__all__ = ['MAGIC', 'STDLIB_NAMES', 'ModuleInfo', 'Refused', 'find_spec', 'inside', 'is_stdlib',
           'module_info', 'file_mtime', 'policy_listing', 'search_roots']

#: This Python's bytecode magic: bytecode goes only to hosts with the same.
MAGIC = importlib.util.MAGIC_NUMBER
LISTING_LIMIT = 2000     # data-file names listed per package (importlib.resources)


class Refused(Exception):
    """Not served, and the remote is told why."""


def _stdlib_names():
    names = set(getattr(sys, 'stdlib_module_names', ()))
    names.update(sys.builtin_module_names)
    return names


#: The standard library's top-level module names (a host imports its own).
STDLIB_NAMES = _stdlib_names()
_STDLIB_DIRS = tuple(os.path.realpath(p) for p in {
    sysconfig.get_paths()['stdlib'], sysconfig.get_paths()['platstdlib']})


def is_stdlib(fullname, origin=None):
    top = fullname.partition('.')[0]
    if top in STDLIB_NAMES:
        return True
    if origin and not STDLIB_NAMES:  # Python 3.9: no stdlib_module_names
        real = os.path.realpath(origin)
        return real.startswith(_STDLIB_DIRS) and 'site-packages' not in real
    return False


def inside(path, roots):
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


_roots = (None, [])  # type: tuple  # (what they were computed from, the real sys.path directories)


def search_roots():
    """The real paths of the sys.path entries, recomputed only when sys.path
    (or, for '' entries, the working directory) changes: resolving them for
    every module served cost 0.6 ms a module."""
    global _roots
    key = (tuple(p for p in sys.path if isinstance(p, str)), os.getcwd() if '' in sys.path else None)
    if _roots[0] != key:
        _roots = (key, [os.path.realpath(p or os.getcwd()) for p in key[0]])
    return _roots[1]


def _imported_package_roots(fullname):
    """The directories of ``fullname``'s top-level package, if the controller
    imported it from source through some finder: an editable install's finder
    maps the name to a directory that is not itself on sys.path."""
    top = sys.modules.get(fullname.partition('.')[0])
    spec = getattr(top, '__spec__', None)
    if spec is None or not (spec.origin or '').endswith('.py'):
        return []
    return [os.path.realpath(p) for p in (spec.submodule_search_locations or ())]


class ModuleInfo(object):
    """One servable module: its source and what it imports (see chopsticks.modscan.static_imports)."""

    __slots__ = ('name', 'kind', 'origin', 'source', 'package_dir', 'listing',
                 'imports', 'lazy_imports', 'attributes', 'required', 'loader', 'mtime',
                 'code', 'listings')

    def entry(self, with_code=False):
        """What the remote gets.  ``with_code`` (a remote running our Python
        version) adds the compiled module, so the remote skips compiling."""
        code = self.bytecode() if with_code else None
        return (self.kind, self.origin, self.source, self.package_dir, self.listing,
                MAGIC, code)

    def bytecode(self):
        """The module compiled by this interpreter (marshal), made once: from
        its up-to-date ``__pycache__`` file when there is one."""
        if self.code is None and self.kind == 'source':
            self.code = _cached_bytecode(self.origin, self.source)
        if self.code is None and self.kind == 'source':
            try:
                self.code = marshal.dumps(compile(self.source, self.origin, 'exec',
                                                  dont_inherit=True))
            except (SyntaxError, ValueError):
                self.code = b''  # let the remote report the error from the source
        return self.code or None

    def compiled(self):
        """The code object, from bytecode(); None for a module that does not compile."""
        code = self.bytecode()
        try:
            return marshal.loads(code) if code else None
        except (EOFError, ValueError, TypeError):
            return None


_cache = {}  # type: dict
_cache_lock = threading.Lock()


def _cached_bytecode(origin, source):
    """The code in ``origin``'s .pyc if it was made from exactly ``source`` by us."""
    try:
        with open(importlib.util.cache_from_source(origin), 'rb') as f:
            data = f.read()
        flags = int.from_bytes(data[4:8], 'little')
        mtime = int(os.stat(origin).st_mtime) & 0xFFFFFFFF
    except (OSError, ValueError, NotImplementedError):
        return None
    if data[:4] != MAGIC or flags != 0 or len(data) < 16:
        return None
    if int.from_bytes(data[8:12], 'little') != mtime or \
            int.from_bytes(data[12:16], 'little') != len(source) & 0xFFFFFFFF:
        return None
    return data[16:]


def find_spec(fullname):
    """Our spec for ``fullname`` without importing anything."""
    module = sys.modules.get(fullname)
    spec = getattr(module, '__spec__', None) if module is not None else None
    if spec is not None:
        return spec
    parent, _, _ = fullname.rpartition('.')
    if parent:
        parent_spec = find_spec(parent)
        if parent_spec is None or parent_spec.submodule_search_locations is None:
            return None
        path = list(parent_spec.submodule_search_locations)
    else:
        path = sys.path
    return importlib.machinery.PathFinder.find_spec(fullname, path)


def module_info(fullname):
    """The ModuleInfo for ``fullname``; None if we don't have it; Refused if we
    have it but cannot serve it."""
    if not MODULE_NAME.match(fullname):
        raise Refused('%r is not a module name' % fullname)
    if is_stdlib(fullname):
        return None
    spec = find_spec(fullname)
    if spec is None:
        return None
    key = (fullname, spec.origin)
    with _cache_lock:
        info = _cache.get(key)
    if info is not None and (info.mtime is None or file_mtime(info.origin) == info.mtime):
        return info
    info = _load_info(fullname, spec)
    with _cache_lock:
        _cache[key] = info
    return info


def file_mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except (OSError, TypeError):
        return None


def _load_info(fullname, spec):
    loader = spec.loader
    info = ModuleInfo()
    info.name = fullname
    info.loader = loader
    info.imports = ()
    info.lazy_imports = ()
    info.attributes = frozenset()
    info.required = ()
    info.listing = None
    info.mtime = None
    info.code = None
    info.listings = {}  # ServePolicy.key -> listing as that policy filters it
    locations = spec.submodule_search_locations
    if loader is None or type(loader).__name__ in ('NamespaceLoader', '_NamespaceLoader'):
        paths = [p for p in (locations or ()) if inside(os.path.realpath(p), search_roots())]
        if not paths:
            raise Refused('namespace package %s has no portion under sys.path' % fullname)
        info.kind = 'namespace'
        info.origin = None
        info.source = b''
        info.package_dir = paths[0]
        return info
    origin = spec.origin
    if isinstance(loader, importlib.machinery.ExtensionFileLoader):
        raise Refused('%s is a compiled extension module on the controller (%s); '
                      'install it on the remote host' % (fullname, origin))
    if is_stdlib(fullname, origin):
        return None
    if isinstance(loader, zipimport.zipimporter):
        archive = os.path.realpath(loader.archive)
        if not inside(archive, search_roots()):
            raise Refused('%s is in %s, which is not on sys.path' % (fullname, archive))
        source = loader.get_source(fullname)
        if source is None:
            raise Refused('%s has no source in %s' % (fullname, archive))
        info.source = source.encode('utf-8')
    elif origin and origin.endswith('.py') and os.path.isfile(origin):
        # SourceFileLoader, and look-alikes such as pytest's assertion rewriter
        real = os.path.realpath(origin)
        if not inside(real, search_roots() + _imported_package_roots(fullname)):
            raise Refused('%s resolves to %s, outside sys.path' % (fullname, real))
        info.mtime = file_mtime(origin)
        with open(origin, 'rb') as f:
            info.source = f.read()
    else:
        raise Refused('%s is loaded by %s on the controller, which chopsticks cannot serve'
                      % (fullname, type(loader).__name__))
    info.kind = 'source'
    info.origin = origin
    info.package_dir = os.path.dirname(origin) if locations is not None else None
    if info.package_dir is not None:
        info.listing = _listing(info.package_dir, loader)
    code = info.compiled()
    if code is not None:
        info.imports, info.lazy_imports, info.attributes = modscan.static_imports(
            fullname, info.source, info.package_dir is not None, code)
        # (a docstring's "from relative deltas" matches too: it imports nothing)
        info.required = tuple(set(info.imports).intersection(
            m.decode('ascii').partition('.')[0] for m in _UNCONDITIONAL_IMPORT.findall(info.source)))
    return info


# "import x" or "from x import y" at column 0: outside any try, if or function.
_UNCONDITIONAL_IMPORT = re.compile(br'^(?:import|from)[ \t]+([A-Za-z_][\w.]*)', re.M)


def _listing(package_dir, loader):
    """Relative names of the files and directories in a package: its
    resources, as a ServePolicy may filter them (no dot names here)."""
    listing = {}
    if isinstance(loader, zipimport.zipimporter):
        import zipfile
        prefix = os.path.relpath(package_dir, loader.archive).replace(os.sep, '/') + '/'
        with zipfile.ZipFile(loader.archive) as zf:
            for name in zf.namelist():
                if name.startswith(prefix) and name != prefix:
                    rel = name[len(prefix):].rstrip('/')
                    if dotted(rel):
                        continue
                    listing[rel] = 'dir' if name.endswith('/') else 'file'
                    if len(listing) >= LISTING_LIMIT:
                        break
        return listing
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = [d for d in dirs if d != '__pycache__' and not d.startswith('.')]
        rel_root = os.path.relpath(root, package_dir).replace(os.sep, '/')
        rel_root = '' if rel_root == '.' else rel_root + '/'
        for d in dirs:
            listing[rel_root + d] = 'dir'
        for name in files:
            if not name.endswith('.pyc') and not name.startswith('.'):
                listing[rel_root + name] = 'file'
        if len(listing) >= LISTING_LIMIT:
            break
    return listing


def policy_listing(listing, package_dir, top, zipped, policy):
    """``listing`` without the files ``policy`` does not serve (directories
    are kept only when something under them is)."""
    if listing is None or zipped or top in policy.named:
        return listing
    kept = {}
    for rel, kind in listing.items():
        if kind == 'file' and policy.allows_data(
                top, os.path.realpath(os.path.join(package_dir, rel)), zipped):
            kept[rel] = kind
            parts = rel.split('/')
            for i in range(1, len(parts)):
                kept['/'.join(parts[:i])] = 'dir'
    return kept

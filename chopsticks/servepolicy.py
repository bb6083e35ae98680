"""What the import server may hand one host: its serving policy.

By default a host may import any pure-Python module on the controller's
``sys.path`` by name, and read as package data only what an installed
distribution ships (its RECORD) or a zip holds; never a file or directory
whose name starts with a dot.  ``CHOPSTICKS_SERVE=pkg,...`` (or ``serve=``)
limits serving to named top-level packages, ``*`` adding the default for the
rest, ``none`` serving chopsticks and its plugins only.  The README's
security section and docs/reliability.rst explain it for users.
"""
import os
import sys
import threading

__all__ = ['ENV_SERVE', 'ServePolicy', 'dotted', 'plugin_packages', 'shipped_by']


#: The environment variable that limits serving: ``pkg,other``, ``pkg,*`` or ``none``.
ENV_SERVE = 'CHOPSTICKS_SERVE'


class ServePolicy(object):
    """Which modules and data files one connection's host may have.

    ``names`` None: the default (any module on sys.path; data a distribution
    ships).  A list of top-level package names: only those (and chopsticks and
    its plugins, which the host runs for us), all their non-dot files counting
    as data; ``'*'`` in the list adds the default for every other module; an
    empty list serves chopsticks and its plugins only."""

    def __init__(self, names=None):
        if names is None:
            names = _names_from_env()
        if isinstance(names, str):
            names = [names]
        self.everything = names is None or '*' in names
        self.named = frozenset(n for n in (names or ()) if n not in ('*', 'none'))
        self.key = (self.everything, self.named)

    def allows_module(self, fullname):
        top = fullname.partition('.')[0]
        return (self.everything or top in self.named or top == 'chopsticks'
                or top in plugin_packages())

    def why_not(self, fullname):
        return ('%s is not served to this host: serving is limited to %s (%s or serve=)'
                % (fullname, ', '.join(sorted(self.named)) or 'chopsticks', ENV_SERVE))

    def allows_data(self, top, real, zipped):
        """Whether the file ``real`` of a served package (top-level name
        ``top``) is data the host may read; dot names were refused before."""
        if top in self.named or zipped or real.endswith('.py'):
            return True
        return real in (shipped_by(top) or ())


def _names_from_env():
    value = os.environ.get(ENV_SERVE)
    if value is None:
        return None
    names = [n.strip() for n in value.split(',') if n.strip()]
    return [] if names == ['none'] else names


_shipped = None  # _Shipped: what the installed distributions ship, read as asked
# Connections serve modules from many threads at once: one of them reads, the
# others wait for it rather than read it all again.
_shipped_lock = threading.Lock()
# Where a distribution lists its files, as importlib.metadata reads them.
_FILE_LISTS = ('RECORD', 'installed-files.txt', 'SOURCES.txt')


class _Shipped(object):
    """The installed distributions' file lists, and by top-level name the
    real paths of the files they ship there, worked out on first use: parsing
    every list and resolving every file took 0.6 s in a test environment
    (thousands of Babel locale files), its raw text 6 ms."""

    def __init__(self):
        import importlib.metadata
        self.lists = []  # (distribution, the raw text of its file lists)
        for dist in importlib.metadata.distributions():
            try:
                text = ''.join(dist.read_text(name) or '' for name in _FILE_LISTS)
            except Exception:
                continue  # unreadable: its files are not served as data
            self.lists.append((dist, text))
        self.by_top = {}

    def real_paths(self, top):
        if top not in self.by_top:
            located = []
            for dist, text in self.lists:
                if top + '/' not in text and top + '\\' not in text:
                    continue  # lists no file under top: no need to parse it
                try:
                    files = dist.files or ()
                except Exception:
                    continue  # a broken RECORD: its files are not served as data
                located.extend(str(dist.locate_file(f)) for f in files
                               if len(f.parts) > 1 and f.parts[0] == top)
            self.by_top[top] = frozenset(os.path.realpath(path) for path in located) \
                if located else None
        return self.by_top[top]


def shipped_by(top):
    """The real paths of the files installed distributions ship under the
    top-level name ``top`` (their RECORDs); ``None`` when none ships any.
    Read once per process (an editable install lists none of its package's files)."""
    global _shipped
    if top == '..' or top.endswith(('.dist-info', '.data')):
        return None
    with _shipped_lock:
        if _shipped is None:
            _shipped = _Shipped()
        return _shipped.real_paths(top)


def dotted(rel_path):
    """Whether a path relative to a package has a component that starts with
    a dot (.env, .git/, .secrets/...): never served, nor listed."""
    return any(part.startswith('.') for part in rel_path.replace(os.sep, '/').split('/'))


def plugin_packages():
    """The top-level packages of the loaded chopsticks plugins (hosts run
    them on the controller's behalf, so every policy serves them)."""
    plugins = sys.modules.get('chopsticks.plugins')  # not imported: no plugin is in use
    return plugins.get_plugin_manager().plugin_packages() if plugins is not None else ()

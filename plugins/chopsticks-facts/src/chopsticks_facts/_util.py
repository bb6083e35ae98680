"""Helpers for the fact modules.  Runs on the host: standard library only, Python 3.6+.

The fact modules import their heavier standard modules (platform, socket,
shutil) in the functions that need them: chopsticks-pkg imports this package
on every host for package_manager, and those imports cost 8 ms there.
"""
import os
import subprocess
import sys
import threading


class Job(object):
    """A function running in a daemon thread, whose result can be awaited with a timeout.

    A thread blocked in the kernel (``statvfs`` on a dead NFS server) cannot be
    interrupted; a daemon thread at least never keeps the host's Python alive.
    """

    def __init__(self, fn, args=()):
        self._fn = fn
        self._args = args
        self._done = threading.Event()
        self._value = None
        self._error = None
        self._thread = threading.Thread(
            target=self._run, name="chopsticks-facts-%s" % getattr(fn, "__name__", "job"))
        self._thread.daemon = True

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # handed to whoever waits for the result
            self._error = exc
        finally:
            self._done.set()

    def result(self, timeout):
        """The function's return value; re-raises its exception; TimeoutError after ``timeout`` s."""
        if not self._done.wait(timeout):
            raise TimeoutError("%s did not finish within %gs" % (
                getattr(self._fn, "__name__", "the call"), timeout))
        if self._error is not None:
            raise self._error
        return self._value


def call_with_timeout(timeout, fn, *args):
    """``fn(*args)`` in a daemon thread; TimeoutError if it takes longer than ``timeout`` s."""
    return Job(fn, args).start().result(timeout)


def read_text(path, default=None):
    """The stripped contents of a small text file, or ``default`` if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except (IOError, OSError, UnicodeDecodeError):
        return default


def run(argv):
    """stdout of a command that must succeed (for the few macOS facts that need one)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    out, err = proc.communicate()
    if proc.returncode:
        raise OSError("%s exited with status %d: %s" % (" ".join(argv), proc.returncode, err.strip()))
    return out


def unsupported(fact):
    """The error a fact raises on a platform it does not know."""
    import platform

    return NotImplementedError("the fact %r supports Linux%s; this host runs %s (%s)" % (
        fact, " and macOS" if fact not in MACOS_UNSUPPORTED else "",
        platform.system() or "an unknown system", sys.platform))


def which(name):
    """The path of the command ``name`` on ``$PATH`` (``shutil.which`` for a bare
    name, without shutil's archive modules), or None."""
    path = os.environ.get("PATH")
    if path is None:
        try:
            path = os.confstr("CS_PATH")
        except (AttributeError, ValueError):
            path = None
        path = path or os.defpath
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or os.curdir, name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


MACOS_UNSUPPORTED = ("interfaces", "default_route", "disks")
LINUX = sys.platform.startswith("linux")
MACOS = sys.platform == "darwin"

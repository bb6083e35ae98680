"""Groups: one operation on many hosts at once.

    from chopsticks.group import Group

    web = Group(['web1', 'web2', Local('build')])
    for host, load in web.call(os.getloadavg).successful():
        print(host, load)

A :class:`Group` runs an operation on all its tunnels in parallel and returns
a :class:`GroupResult`: a dict keyed by host name in which a host that failed
holds an :class:`ErrorResult`.  One host that cannot be reached, raises or
times out never stops the others.

How the work is spread (the scheduler, :mod:`chopsticks.dispatch`, shared
with :mod:`chopsticks.queue`; the operations, :mod:`chopsticks.operations`):

* A call is pickled once and the same bytes are sent to every host.  Replies
  arrive as futures from the core's single broker thread: no thread per host.
* At most ``max_parallel`` hosts are busy at once, and at most
  ``max_connect`` of them are connecting; a connect that sshd drops at the
  handshake (``MaxStartups``) is retried with backoff, and halves the
  concurrent connects for the rest of the operation.
* A host whose connection failed is remembered by the group and not tried
  again by later operations (each reports the same error at once) until
  ``connect()`` or ``close()``: a dead host costs one connect timeout, not
  one per call.
* File transfers block a thread each, so they run in the same bounded pool.
* When stderr is a terminal and ``rich`` is installed, an operation that
  runs longer than half a second shows a progress bar; ``progress=False``
  turns it off.
"""
import copy
import functools
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from .dispatch import Dispatcher, GroupTunnel
from .errors import ChopsticksError, RemoteException
from .operations import Operation, call_op, connect_op, fetch_op, fetch_paths, put_op
from .progress import GroupProgress  # one module draws every progress bar

__all__ = [
    'Group', 'GroupResult', 'ErrorResult', 'GroupFailures',
    'DEFAULT_MAX_PARALLEL', 'DEFAULT_MAX_CONNECT', 'new_dispatcher', 'is_tunnel',
]

DEFAULT_MAX_PARALLEL = 64   # hosts busy at once
DEFAULT_MAX_CONNECT = 16    # hosts connecting at once

_GROUP_TIMEOUT: Any = object()   # "the group's own timeout"

Tunnel = GroupTunnel  # a chopsticks.tunnel.BaseTunnel, or anything with the same interface

# This module runs on Python 3.6 too (a relay host may fan out from there).


# --- results --------------------------------------------------------------------------

class ErrorResult(object):
    """What a host that failed holds in a :class:`GroupResult`.

    ``msg``
        what went wrong, without the ``[host]`` prefix: ``'KeyError: 'x''``,
        ``'could not connect: ...'`` (with ssh's stderr), ``'mod.fn did not
        finish within 5s'``.
    ``remote_traceback`` (also ``tb``, as in chopsticks 1.x)
        the remote traceback as text when the remote function raised, else None.
    ``exception``
        the exception itself: a :class:`~chopsticks.errors.RemoteException`,
        ``ConnectError``, ``CallTimeout``, ``TunnelClosed``, or a local error
        of a file transfer.
    ``host``
        the host's name.
    """

    __slots__ = ('host', 'exception', 'msg', 'remote_traceback')

    def __init__(self, host: str, exception: BaseException) -> None:
        self.host = host
        self.exception = exception
        if isinstance(exception, RemoteException):
            self.msg = '%s: %s' % (exception.type_name, exception.msg)
            self.remote_traceback = exception.remote_traceback or None
        else:
            text = str(exception)
            prefix = '[%s] ' % host
            if text.startswith(prefix):
                text = text[len(prefix):]
            if not isinstance(exception, ChopsticksError):
                text = '%s: %s' % (type(exception).__name__, text) if text else type(exception).__name__
            self.msg = text
            self.remote_traceback = None

    @property
    def tb(self) -> Optional[str]:
        return self.remote_traceback

    def __repr__(self) -> str:
        return 'ErrorResult(host=%r, msg=%r)' % (self.host, self.msg)

    def __str__(self) -> str:
        return '[%s] %s' % (self.host, self.msg)


class GroupResult(dict):
    """The results of a group operation: ``{host: value}``, in the group's order.

    A host that failed holds an :class:`ErrorResult` instead of a value.
    """

    def successful(self) -> Iterator[Tuple[str, Any]]:
        """The ``(host, value)`` pairs of the hosts that succeeded."""
        return ((host, value) for host, value in self.items() if not isinstance(value, ErrorResult))

    def failures(self) -> Iterator[Tuple[str, ErrorResult]]:
        """The ``(host, ErrorResult)`` pairs of the hosts that failed."""
        return ((host, value) for host, value in self.items() if isinstance(value, ErrorResult))

    def raise_failures(self) -> 'GroupResult':
        """Raise :class:`GroupFailures` if any host failed; else return self."""
        if any(isinstance(value, ErrorResult) for value in self.values()):
            raise GroupFailures(self)
        return self

    def __repr__(self) -> str:
        return '%s(%s)' % (type(self).__name__, dict.__repr__(self))


class GroupFailures(RemoteException):
    """Raised by :meth:`GroupResult.raise_failures`: some hosts failed.

    ``failures`` maps each failed host to its :class:`ErrorResult`;
    ``results`` is the whole :class:`GroupResult`.  A ``RemoteException``,
    as in chopsticks 1.x; ``host`` lists the failed hosts.
    """

    def __init__(self, results: GroupResult) -> None:
        self.results = results
        self.failures = dict(results.failures())
        summary = '%d of %d hosts failed' % (len(self.failures), len(results))
        super().__init__(', '.join(self.failures), 'GroupFailures', summary, '')

    def __str__(self) -> str:
        lines = [self.msg + ':']
        for err in self.failures.values():
            first, _, rest = err.msg.partition('\n')
            lines.append('  [%s] %s' % (err.host, first))
            lines.extend('    ' + line for line in rest.splitlines())
        return '\n'.join(lines)


# --- groups ---------------------------------------------------------------------------

def new_dispatcher(max_parallel: int = DEFAULT_MAX_PARALLEL, max_connect: int = DEFAULT_MAX_CONNECT,
                   progress: bool = True, connect_failures: Optional[Dict[Any, BaseException]] = None,
                   what: str = '') -> Dispatcher:
    """A :class:`~chopsticks.dispatch.Dispatcher` that shows the group's progress bar."""
    return Dispatcher(max_parallel, max_connect, progress, connect_failures, what,
                      progress_factory=GroupProgress)


def _tunnel_from_string(host: str, via: Optional[Tunnel] = None) -> Tunnel:
    extra = {} if via is None else {'via': via}
    try:
        # Imported here: chopsticks.hosts needs pluggy, which a relay host
        # (maybe Python 3.6) does not have; there a host string is an SSH host.
        from .hosts import tunnel_from_url
    except ImportError:
        from .tunnel import SSHTunnel
        return SSHTunnel(host, **extra)
    return tunnel_from_url(host, **extra)


def is_tunnel(obj: Any) -> bool:
    """Whether ``obj`` is used as a tunnel: it has ``call_async`` and ``host`` (and is no Group)."""
    return hasattr(obj, 'call_async') and hasattr(obj, 'host') and not isinstance(obj, Group)


def _tunnels_of(hosts: Any, via: Optional[Tunnel] = None) -> List[Tunnel]:
    """Tunnels from host strings, tunnels, groups, or an iterable of them,
    without repeating one; two different tunnels of one name are an error.
    Host strings become tunnels opened from ``via`` when it is given."""
    if isinstance(hosts, str) or is_tunnel(hosts) or isinstance(hosts, Group):
        hosts = [hosts]
    if isinstance(via, str):  # 'ssh://relay', 'local': the relay's own host string
        via = _tunnel_from_string(via)
    tunnels: List[Tunnel] = []
    by_name: Dict[str, Tunnel] = {}
    from_string: Dict[str, Tunnel] = {}
    for item in hosts:
        if isinstance(item, Group):
            items = item.tunnels
        elif isinstance(item, str):
            if item not in from_string:
                from_string[item] = _tunnel_from_string(item, via)
            items = [from_string[item]]
        elif is_tunnel(item):
            items = [item]
        else:
            raise TypeError('a Group is made of tunnels, host strings and groups, not %r' % (item,))
        for tunnel in items:
            seen = by_name.get(tunnel.host)
            if seen is tunnel:
                continue
            if seen is not None:
                raise ValueError('two different tunnels are named %r; results are keyed by host '
                                 'name, so give them distinct names (e.g. Local(%r))'
                                 % (tunnel.host, tunnel.host + '-2'))
            by_name[tunnel.host] = tunnel
            tunnels.append(tunnel)
    return tunnels


class Group(object):
    """Tunnels to many hosts, for running operations on all of them in parallel.

    ``hosts`` holds tunnels, host strings (``'web1'``, ``'user@web1:2222'``,
    ``'local'``, ``'sudo://user'``, ``'docker://name'``,
    ``'sudo://root?via=ssh://web1'``: see ``chopsticks.hosts.tunnel_from_url``)
    and groups.  Host names must be
    unique: results are keyed by them.

    ``max_parallel`` bounds the hosts busy at once, ``max_connect`` the hosts
    connecting at once; ``timeout`` is the default per-host timeout, in
    seconds, of every operation (from when the operation starts on that host,
    after it is connected; a transfer that overruns it is aborted by closing
    that host's tunnel).  ``progress=False`` never shows a progress bar.

    Groups behave like sets of tunnels compared by host name: ``|`` (or
    ``+``), ``&``, ``-``, ``^`` and ``union``, ``intersection``,
    ``difference``, ``symmetric_difference``, with groups and tunnels; a
    tunnel acts as a group of one.  ``len``, iteration (over tunnels) and
    ``in`` (a tunnel or a host name) work as for a set.

    ``via=relay`` (a tunnel or a host string) opens the tunnels of host
    strings from the host ``relay`` (see ``chopsticks.relay``): the controller holds one connection, to the
    relay, which fans out to the hosts and serves them their imports.
    Each call still goes to each host; ``chopsticks.RelayedGroup(group)``
    sends one call per relay instead (for thousands of hosts).
    """

    def __init__(self, hosts: Iterable[Any], max_parallel: int = DEFAULT_MAX_PARALLEL,
                 timeout: Optional[float] = None, *, max_connect: int = DEFAULT_MAX_CONNECT,
                 progress: bool = True, via: Any = None) -> None:
        if max_parallel < 1 or max_connect < 1:
            raise ValueError('max_parallel and max_connect must be at least 1')
        self.tunnels: List[Tunnel] = _tunnels_of(hosts, via)
        self.max_parallel = max_parallel
        self.max_connect = max_connect
        self.timeout = timeout
        self.progress = progress
        # Tunnels whose connection failed: not tried again until connect()/close().
        self._connect_errors: Dict[Tunnel, BaseException] = {}

    @property
    def hosts(self) -> List[str]:
        """The host names, in order."""
        return [t.host for t in self.tunnels]

    def __repr__(self) -> str:
        return '%s(%r)' % (type(self).__name__, self.tunnels)

    def __len__(self) -> int:
        return len(self.tunnels)

    def __iter__(self) -> Iterator[Tunnel]:
        return iter(self.tunnels)

    def __contains__(self, item: Any) -> bool:
        host = item if isinstance(item, str) else getattr(item, 'host', None)
        return any(t.host == host for t in self.tunnels)

    # --- connecting
    def connect(self) -> GroupResult:
        """Connect every tunnel not connected yet, trying again those that
        failed before.  Returns ``{host: remote_info}``, with an ErrorResult
        for each host that could not be reached (it does not raise)."""
        for tunnel in self.tunnels:
            self._connect_errors.pop(tunnel, None)
        return self._run(connect_op(), None)

    async def aconnect(self) -> GroupResult:
        for tunnel in self.tunnels:
            self._connect_errors.pop(tunnel, None)
        return await self._arun(connect_op(), None)

    def close(self) -> None:
        """Stop every agent (tunnels reconnect if used again)."""
        self._connect_errors.clear()
        for tunnel in self.tunnels:
            tunnel.close()

    def __enter__(self) -> 'Group':
        self.connect()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # --- operations
    def call(self, fn: Callable[..., Any], *args: Any, timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        """Run ``fn(*args, **kwargs)`` on every host: ``{host: value or ErrorResult}``.

        The call is pickled once for all hosts.  ``timeout`` (seconds, per
        host) overrides the group's.  To pass ``fn`` a keyword argument named
        ``timeout``, wrap it in ``functools.partial``.
        """
        return self._run(call_op(fn, args, kwargs), timeout)

    async def acall(self, fn: Callable[..., Any], *args: Any, timeout: Any = _GROUP_TIMEOUT,
                    **kwargs: Any) -> GroupResult:
        """``await group.acall(fn, ...)``: ``call`` without blocking the event loop."""
        return await self._arun(call_op(fn, args, kwargs), timeout)

    def put(self, local_path: str, remote_path: Optional[str] = None, mode: int = 0o644, *,
            timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        """Copy a local file (or tree) to every host; ``{host: put's result dict}``.

        See ``chopsticks.files.put``: with no ``remote_path``, each host
        gets a temporary name.
        """
        return self._run(put_op(local_path, remote_path, mode, kwargs), timeout)

    async def aput(self, local_path: str, remote_path: Optional[str] = None, mode: int = 0o644, *,
                   timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        return await self._arun(put_op(local_path, remote_path, mode, kwargs), timeout)

    def fetch(self, remote_path: str, local_path: Optional[str] = None, *,
              timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        """Copy ``remote_path`` from every host; ``{host: fetch's result dict}``.

        ``local_path`` is a template in which ``{host}`` is replaced by each
        host's name (``'backup/{host}/passwd'``; missing directories are
        made); it must give each host its own path.  A host name stands for
        one path component (``/`` in it becomes ``_``); a host named ``..``
        or ``.`` fails with an ErrorResult instead of writing beside the
        others' directories.  By default each host's
        copy goes to ``<new temporary directory>/<host>/<file name>``: the
        result's ``local_path`` says where.
        """
        return self._run(self._fetch_op(remote_path, local_path, kwargs), timeout)

    async def afetch(self, remote_path: str, local_path: Optional[str] = None, *,
                     timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        return await self._arun(self._fetch_op(remote_path, local_path, kwargs), timeout)

    def _fetch_op(self, remote_path: str, local_path: Optional[str], kwargs: Dict[str, Any]) -> Operation:
        return fetch_op(remote_path, fetch_paths(self.tunnels, remote_path, local_path), kwargs)

    def filter(self, predicate: Callable[[], Any], exclude: bool = False, *,
               timeout: Any = _GROUP_TIMEOUT) -> 'Group':
        """The group of the hosts where ``predicate()``, called there, is true
        (false with ``exclude=True``).

        Raises :class:`GroupFailures` if a host could not be reached or the
        predicate raised there.  (To select by name, build a group:
        ``Group(t for t in group if ...)``.)
        """
        results = self.call(predicate, timeout=timeout).raise_failures()
        keep = {host for host, value in results.items() if bool(value) != bool(exclude)}
        return self._derive([t for t in self.tunnels if t.host in keep])

    def _dispatcher(self, op: Operation, timeout: Any) -> Tuple[Dispatcher, Callable[[], GroupResult]]:
        if timeout is _GROUP_TIMEOUT:
            timeout = self.timeout
        dispatcher = new_dispatcher(self.max_parallel, self.max_connect, self.progress,
                                    self._connect_errors, op.what)
        results: Dict[str, Any] = {}
        dispatcher.add_each([(tunnel, functools.partial(_store, results, tunnel.host))
                             for tunnel in self.tunnels], op, timeout)
        return dispatcher, lambda: GroupResult((t.host, results[t.host]) for t in self.tunnels)

    def _run(self, op: Operation, timeout: Any) -> GroupResult:
        dispatcher, results = self._dispatcher(op, timeout)
        dispatcher.run()
        return results()

    async def _arun(self, op: Operation, timeout: Any) -> GroupResult:
        dispatcher, results = self._dispatcher(op, timeout)
        await dispatcher.arun()
        return results()

    # --- set operations, by host name
    def _derive(self, tunnels: List[Tunnel], *others: 'Group') -> 'Group':
        group = copy.copy(self)
        group.tunnels = list(tunnels)
        errors = {}
        for source in (self,) + others:
            errors.update(source._connect_errors)
        members = set(group.tunnels)
        group._connect_errors = {t: e for t, e in errors.items() if t in members}
        return group

    def _set_op(self, other: Any, keep_left: Callable[[bool], bool], add_right: bool) -> 'Group':
        if not isinstance(other, Group):
            other = Group(other)
        right = set(other.hosts)
        tunnels = [t for t in self.tunnels if keep_left(t.host in right)]
        if add_right:
            left = set(self.hosts)
            tunnels += [t for t in other.tunnels if t.host not in left]
        return self._derive(tunnels, other)

    def union(self, *others: Any) -> 'Group':
        """The hosts in this group or any of ``others`` (this group's tunnel wins a name)."""
        return functools.reduce(lambda g, o: g._set_op(o, lambda _: True, True), others, self)

    def intersection(self, *others: Any) -> 'Group':
        """The hosts in this group and in all of ``others``."""
        return functools.reduce(lambda g, o: g._set_op(o, lambda inside: inside, False), others, self)

    def difference(self, *others: Any) -> 'Group':
        """The hosts in this group and in none of ``others``."""
        return functools.reduce(lambda g, o: g._set_op(o, lambda inside: not inside, False), others, self)

    def symmetric_difference(self, other: Any) -> 'Group':
        """The hosts in exactly one of this group and ``other``."""
        return self._set_op(other, lambda inside: not inside, True)

    def _operand(self, other: Any) -> Optional['Group']:
        if isinstance(other, Group):
            return other
        if is_tunnel(other):
            return self._derive([other])
        return None

    def _binary(name: str, reflected: bool = False) -> Callable[['Group', Any], Any]:  # type: ignore[misc]
        def op(self: 'Group', other: Any) -> Any:
            operand = self._operand(other)
            if operand is None:
                return NotImplemented
            left, right = (operand, self) if reflected else (self, operand)
            return getattr(left, name)(right)
        op.__name__ = '__%s%s__' % ('r' if reflected else '', name)
        return op

    __or__ = __add__ = _binary('union')
    __ror__ = __radd__ = _binary('union', reflected=True)
    __and__ = _binary('intersection')
    __rand__ = _binary('intersection', reflected=True)
    __sub__ = _binary('difference')
    __rsub__ = _binary('difference', reflected=True)
    __xor__ = _binary('symmetric_difference')
    __rxor__ = _binary('symmetric_difference', reflected=True)
    del _binary

    def run(self, command: Any, **kwargs: Any) -> GroupResult:
        """Run a shell command on every host at once: a GroupResult of
        CommandResult; see ``chopsticks.shell.run_group``."""
        from .shell import run_group
        return run_group(self, command, **kwargs)


def _store(results: Dict[str, Any], host: str, value: Any, exc: Optional[BaseException]) -> None:
    results[host] = value if exc is None else ErrorResult(host, exc)

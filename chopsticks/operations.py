"""The operations a Group or a Queue runs on each tunnel: call, put, fetch, connect.

Each function here builds an :class:`Operation` once for
all the tunnels it will run on (a call is pickled once, for every host).

This module runs on Python 3.6 too (a relay host may fan out from there).
"""
import concurrent.futures
import inspect
import os
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Tuple, Union

from .errors import TunnelClosed
from .serialize import describe, dumps_call

__all__ = [
    'Operation', 'Settle', 'settle_when_done', 'call_op', 'put_op', 'fetch_op', 'connect_op',
    'fetch_paths',
]


#: ``settle(value, exc)``: the outcome of one job (exc is None on success).
Settle = Callable[[Any, Optional[BaseException]], None]


class Operation(NamedTuple):
    """What to do to each tunnel of a job.

    With ``blocking=False``, ``work(tunnel, conn, settle)`` must not block:
    it arranges for ``settle(value, exc)`` to be called with the outcome, on
    any thread, and returns a handle with ``done()`` and ``cancel()`` (a
    Future will do).  ``conn`` is the tunnel's own connection
    (``tunnel.direct_connection``, maybe closed since) for a tunnel that
    opens one itself, else None (a relayed tunnel, or another kind).

    With ``blocking=True``, ``work(tunnel, report)`` is a blocking function
    run on the dispatcher's pool.  ``report`` is what a transfer passes as
    ``progress=`` to chopsticks.files: a callable ``report(bytes_done,
    bytes_total)`` feeding the run's progress bar, False (progress turned
    off) or None (no bar: not a terminal).
    """
    what: str
    work: Callable[..., Any]
    blocking: bool
    # (fn, args, kwargs) of a call that may go out with the connect, right
    # behind the agent (see Tunnel.open_connection): one round trip less per host.
    first_call: Optional[Tuple[Callable[..., Any], tuple, dict]] = None


def settle_when_done(future: 'concurrent.futures.Future[Any]', settle: Settle) -> 'concurrent.futures.Future[Any]':
    """Pass ``future``'s outcome to ``settle(value, exc)`` once it has one
    (a cancelled future's is a CancelledError)."""
    def done(f: 'concurrent.futures.Future[Any]') -> None:
        if f.cancelled():
            settle(None, concurrent.futures.CancelledError())
        elif f.exception() is not None:
            settle(None, f.exception())
        else:
            settle(f.result(), None)
    future.add_done_callback(done)
    return future


def call_op(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Operation:
    """``fn(*args, **kwargs)`` on each tunnel."""
    what = describe(fn)
    payload = _pickle_once(fn, args, kwargs)

    def work(tunnel: Any, conn: Any, settle: Settle) -> Any:
        if payload is None or conn is None:  # a relayed tunnel, or another kind
            return settle_when_done(tunnel.call_async(fn, *args, **kwargs), settle)
        if conn.closed:  # lost since it connected; never reconnect on the dispatcher's thread
            raise TunnelClosed('[%s] connection lost before %s was sent' % (tunnel.host, what))
        conn.send_modules_for(fn)
        # No Future: the reply goes straight to the dispatcher.
        return conn.call_then(payload, what, settle)

    return Operation('call ' + what, work, False, (fn, args, kwargs))


def _pickle_once(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Optional[bytes]:
    """The call pickled for a remote of any Python version, or None when only
    each tunnel can pickle it for its own remote (a function without source
    travels as marshalled code, for a remote of the controller's version)."""
    try:
        return dumps_call(fn, args, kwargs)
    except Exception as error:
        first_error = error
    try:
        dumps_call(fn, args, kwargs, tuple(sys.version_info[:2]))
    except Exception:
        raise first_error from None
    return None


def connect_op() -> Operation:
    """Connect each tunnel; the value is its ``remote_info``."""
    def work(tunnel: Any, conn: Any, settle: Settle) -> Any:
        future: 'concurrent.futures.Future[Any]' = concurrent.futures.Future()
        future.set_result(getattr(tunnel, 'remote_info', True))
        return settle_when_done(future, settle)

    return Operation('connect', work, False)


def put_op(local_path: str, remote_path: Optional[str], mode: int, kwargs: Dict[str, Any]) -> Operation:
    """Copy ``local_path`` to each tunnel (see chopsticks.files.put)."""
    if not os.path.exists(local_path):
        raise FileNotFoundError('cannot put %s: no such file or directory' % local_path)
    transfer = _with_progress(_files_function('put'), kwargs)

    def work(tunnel: Any, report: Any) -> Any:
        return tunnel.put(local_path, remote_path, mode=mode, **transfer(report))

    return Operation('put %s' % local_path, work, True)


#: A tunnel's local path for a fetch, or why it has none.
LocalPath = Union[str, None, ValueError]


def fetch_op(remote_path: str, local_paths: Dict[Any, LocalPath], kwargs: Dict[str, Any]) -> Operation:
    """Copy ``remote_path`` from each tunnel to its path in ``local_paths``
    (see :func:`fetch_paths`; a tunnel missing from it gets fetch's default)."""
    transfer = _with_progress(_files_function('fetch'), kwargs)

    def work(tunnel: Any, report: Any) -> Any:
        local_path = local_paths.get(tunnel)
        if isinstance(local_path, ValueError):
            raise local_path
        if local_path is not None:
            parent = os.path.dirname(local_path)
            if parent:
                os.makedirs(parent, exist_ok=True)
        return tunnel.fetch(remote_path, local_path, **transfer(report))

    return Operation('fetch %s' % remote_path, work, True)


def fetch_paths(tunnels: Iterable[Any], remote_path: str, template: Optional[str]) -> Dict[Any, LocalPath]:
    """Each tunnel's local path for a fetch: ``template`` with ``{host}``
    replaced, or ``<new temp dir>/<host>/<remote file name>``.

    A host name becomes one path component: separators in it become ``_``,
    and a host named ``''``, ``.`` or ``..`` (which would put its file beside
    or above the other hosts') gets a ValueError instead of a path, raised
    for that host alone when the fetch runs.
    """
    if template is None:
        name = os.path.basename(remote_path.rstrip('/')) or 'fetched'
        template = os.path.join(tempfile.mkdtemp(prefix='chopsticks-fetch-'), '{host}', name)
    paths: Dict[Any, LocalPath] = {}
    for tunnel in tunnels:
        component = _path_component(str(tunnel.host))
        if component in ('', '.', '..') and '{host}' in template:
            paths[tunnel] = ValueError(
                '[%s] cannot fetch %s to %r: the host name %r would put the file outside the '
                "template's directory; give the tunnel another name (e.g. Local(name='...'))"
                % (tunnel.host, remote_path, template, tunnel.host))
        else:
            paths[tunnel] = template.replace('{host}', component)
    chosen = [p for p in paths.values() if isinstance(p, str)]
    if len(set(chosen)) < len(chosen):
        raise ValueError('local path %r is the same for several hosts: put {host} in it, '
                         'e.g. %r' % (template, 'fetched/{host}/' + os.path.basename(remote_path)))
    return paths


def _path_component(host: str) -> str:
    for sep in (os.sep, os.altsep):
        if sep:
            host = host.replace(sep, '_')
    return host


def _files_function(name: str) -> Optional[Callable[..., Any]]:
    try:
        from . import files
    except ImportError:
        return None
    return getattr(files, name, None)


def _with_progress(function: Optional[Callable[..., Any]], kwargs: Dict[str, Any]) -> Callable[[Any], Dict[str, Any]]:
    """``kwargs`` plus ``progress=report`` for a transfer function that takes
    it, unless the caller chose its own."""
    try:
        takes_progress = 'progress' in inspect.signature(function).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        takes_progress = False
    if 'progress' in kwargs or not takes_progress:
        return lambda report: kwargs
    return lambda report: dict(kwargs, progress=report)

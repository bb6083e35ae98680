"""Groups: one operation on many hosts at once.

    from chopsticks.group import Group

    web = Group(['web1', 'web2', Local('build')])
    for host, load in web.call(os.getloadavg).successful():
        print(host, load)

A :class:`Group` runs an operation on all its tunnels in parallel and returns
a :class:`GroupResult`: a dict keyed by host name in which a host that failed
holds an :class:`ErrorResult`.  One host that cannot be reached, raises or
times out never stops the others.

How the work is spread (the dispatcher below, shared with
:mod:`chopsticks.queue`):

* A call is pickled once and the same bytes are sent to every host.  Replies
  arrive as futures from the core's single broker thread: no thread per host.
* At most ``max_parallel`` hosts are busy at once, and at most
  ``max_connect`` of them are connecting (connecting blocks, so a small pool
  of threads does it, created for the operation and gone after it).
* sshd refuses bursts of unauthenticated connections (``MaxStartups``,
  10:30:100 by default: past 10 at once it starts dropping them).  A connect
  dropped during the key exchange is retried, up to ``CONNECT_RETRIES``
  times after a jittered backoff, and each drop halves the number of
  concurrent connects for the rest of the operation (it grows back by one
  with each success).
* A host whose connection failed is remembered by the group and not tried
  again by later operations (each reports the same error at once) until
  ``connect()`` or ``close()``: a dead host costs one connect timeout, not
  one per call.
* File transfers block a thread each, so they run in the same bounded pool.
* When stderr is a terminal and ``rich`` is installed, an operation that
  runs longer than half a second shows a progress bar; ``progress=False``
  turns it off.
"""
import asyncio
import collections
import concurrent.futures
import copy
import functools
import heapq
import inspect
import itertools
import logging
import os
import random
import sys
import tempfile
import threading
import time
from typing import (
    Any, Callable, Deque, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple,
)

from .replies import ReplyReader
from .errors import CallTimeout, ChopsticksError, RemoteException, TunnelClosed
from .serialize import describe, dumps_call

__all__ = [
    'Group', 'GroupResult', 'ErrorResult', 'GroupFailures',
    'DEFAULT_MAX_PARALLEL', 'DEFAULT_MAX_CONNECT',
]

log = logging.getLogger('chopsticks')

DEFAULT_MAX_PARALLEL = 64   # hosts busy at once
DEFAULT_MAX_CONNECT = 16    # hosts connecting at once
CONNECT_RETRIES = 3         # extra attempts for a connect dropped at the handshake
RETRY_BACKOFF = 0.5         # seconds before the first retry; doubles, with jitter
PROGRESS_DELAY = 0.5        # seconds an operation runs before it shows progress

# What ssh and paramiko say when sshd drops a connection before the key
# exchange, as it does past MaxStartups: worth retrying, unlike a refused port.
HANDSHAKE_DROPPED = (
    'kex_exchange_identification',
    'Error reading SSH protocol banner',
    'Connection reset by peer',
)

_GROUP_TIMEOUT = object()   # "the group's own timeout"

Tunnel = Any  # a chopsticks.tunnel.BaseTunnel, or anything with the same interface

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

    def __init__(self, host: str, exception: BaseException):
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

    def __init__(self, results: GroupResult):
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


# --- operations: what to do to one tunnel ---------------------------------------------

class _Operation(NamedTuple):
    """With ``blocking=False``, ``work(tunnel, settle)`` must not
    block: it arranges for ``settle(value, exc)`` to be called with the
    outcome, on any thread, and returns a handle with ``done()`` and
    ``cancel()`` (a Future will do).  With ``blocking=True``,
    ``work(tunnel, report)`` is a blocking function run on the dispatcher's
    pool.  ``report`` is what a transfer passes as ``progress=`` to
    chopsticks.files: a callable ``report(bytes_done, bytes_total)`` feeding
    the operation's progress bar, False (progress turned off) or None (no
    bar: not a terminal)."""
    what: str
    work: Callable[[Tunnel], Any]
    blocking: bool
    # (fn, args, kwargs) of a call that may go out with the connect, right
    # behind the agent (see Tunnel.open_connection): one round trip less per host.
    first_call: Optional[tuple] = None


def _call_op(fn: Callable, args: tuple, kwargs: dict) -> _Operation:
    what = describe(fn)
    payload = _pickle_once(fn, args, kwargs)

    def work(tunnel, settle):
        conn = getattr(tunnel, '_conn', None)  # a CallChannel: a Connection or a RelayConnection
        if payload is None or conn is None:
            return _settle_when_done(tunnel.call_async(fn, *args, **kwargs), settle)
        if conn.closed:  # lost since it connected; never reconnect on the dispatcher's thread
            raise TunnelClosed('[%s] connection lost before %s was sent' % (tunnel.host, what))
        conn.send_modules_for(fn)
        # No Future: the reply goes straight to the dispatcher.
        return conn.call_then(payload, what, settle)

    return _Operation('call ' + what, work, False, (fn, args, kwargs))


def _settle_when_done(future: concurrent.futures.Future,
                      settle: Callable[[Any, Optional[BaseException]], None]) -> concurrent.futures.Future:
    """Pass ``future``'s outcome to ``settle(value, exc)`` once it has one
    (a cancelled future's is a CancelledError)."""
    def done(f):
        if f.cancelled():
            settle(None, concurrent.futures.CancelledError())
        elif f.exception() is not None:
            settle(None, f.exception())
        else:
            settle(f.result(), None)
    future.add_done_callback(done)
    return future


def _pickle_once(fn: Callable, args: tuple, kwargs: dict) -> Optional[bytes]:
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


def _put_op(local_path: str, remote_path: Optional[str], mode: int, kwargs: dict) -> _Operation:
    if not os.path.exists(local_path):
        raise FileNotFoundError('cannot put %s: no such file or directory' % local_path)
    transfer = _with_progress(_files_function('put'), kwargs)

    def work(tunnel, report):
        return tunnel.put(local_path, remote_path, mode=mode, **transfer(report))

    return _Operation('put %s' % local_path, work, True)


def _fetch_op(remote_path: str, local_paths: Dict[Tunnel, Optional[str]], kwargs: dict) -> _Operation:
    transfer = _with_progress(_files_function('fetch'), kwargs)

    def work(tunnel, report):
        local_path = local_paths.get(tunnel)
        if local_path is not None:
            parent = os.path.dirname(local_path)
            if parent:
                os.makedirs(parent, exist_ok=True)
        return tunnel.fetch(remote_path, local_path, **transfer(report))

    return _Operation('fetch %s' % remote_path, work, True)


def _files_function(name: str) -> Optional[Callable]:
    try:
        from . import files
    except ImportError:
        return None
    return getattr(files, name, None)


def _with_progress(function: Optional[Callable], kwargs: dict) -> Callable[[Any], dict]:
    """``kwargs`` plus ``progress=report`` for a transfer function that takes
    it, unless the caller chose its own."""
    try:
        takes_progress = 'progress' in inspect.signature(function).parameters
    except (TypeError, ValueError):
        takes_progress = False
    if 'progress' in kwargs or not takes_progress:
        return lambda report: kwargs
    return lambda report: dict(kwargs, progress=report)


def _connect_op() -> _Operation:
    def work(tunnel, settle):
        future = concurrent.futures.Future()
        future.set_result(getattr(tunnel, 'remote_info', True))
        return _settle_when_done(future, settle)

    return _Operation('connect', work, False)


def _fetch_paths(tunnels: List[Tunnel], remote_path: str,
                 template: Optional[str]) -> Dict[Tunnel, str]:
    """Each tunnel's local path for a fetch: ``template`` with ``{host}``
    replaced, or ``<new temp dir>/<host>/<remote file name>``."""
    if template is None:
        name = os.path.basename(remote_path.rstrip('/')) or 'fetched'
        template = os.path.join(tempfile.mkdtemp(prefix='chopsticks-fetch-'), '{host}', name)
    paths = {t: template.replace('{host}', str(t.host).replace(os.sep, '_')) for t in tunnels}
    if len(set(paths.values())) < len(paths):
        raise ValueError('local path %r is the same for several hosts: put {host} in it, '
                         'e.g. %r' % (template, 'fetched/{host}/' + os.path.basename(remote_path)))
    return paths


# --- the dispatcher -------------------------------------------------------------------

class _Job(object):
    __slots__ = ('lane', 'op', 'settle', 'timeout', 'future', 'settled')

    def __init__(self, lane, op, settle, timeout):
        self.lane = lane
        self.op = op
        self.settle = settle
        self.timeout = timeout
        self.future = None
        self.settled = False


class _Lane(object):
    """The jobs for one tunnel, run one after the other."""

    __slots__ = ('tunnel', 'jobs', 'scheduled', 'attempts', 'reading')

    def __init__(self, tunnel):
        self.tunnel = tunnel
        self.reading = None  # the connection whose replies the dispatcher's thread reads
        self.jobs: Deque[_Job] = collections.deque()
        self.scheduled = False  # waiting for a slot, or holding one
        self.attempts = 0       # connects dropped at the handshake, in a row


class _Dispatcher(object):
    """Runs jobs on many tunnels: in order on each tunnel, tunnels in parallel.

    State changes only under ``lock``, on the thread that drives ``run()``
    (or the event loop of ``arun()``), or in ``add()``.  Futures completing
    on other threads only post an event.
    """

    def __init__(self, max_parallel: int, max_connect: int, progress: bool,
                 connect_failures: Optional[Dict[Tunnel, BaseException]] = None,
                 what: str = ''):
        if max_parallel < 1 or max_connect < 1:
            raise ValueError('max_parallel and max_connect must be at least 1')
        self.max_parallel = max_parallel
        self.max_connect = max_connect
        self.show_progress = progress
        self.what = what
        self.connect_failures = {} if connect_failures is None else connect_failures
        self.lock = threading.RLock()
        self._lanes: Dict[int, _Lane] = {}
        self._ready: Deque[_Lane] = collections.deque()         # waiting for a slot
        self._connect_wait: Deque[_Lane] = collections.deque()  # holding a slot, to connect
        self._busy = 0          # lanes holding a slot
        self._connecting = 0
        self._connect_limit = max_connect
        self._timers: List[Tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._unsettled = 0
        self._settled = 0
        self._failed = 0
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._notify: Optional[Callable[[tuple], None]] = None
        self._progress: Optional[_Progress] = None
        self._callback_errors: List[BaseException] = []
        self._reader: Optional[ReplyReader] = None  # while run() runs

    # --- feeding
    def add(self, tunnel: Tunnel, op: _Operation, settle: Callable[[Any, Optional[BaseException]], None],
            timeout: Optional[float] = None) -> None:
        """Queue ``op`` on ``tunnel``; ``settle(value, exc)`` is called once
        with its outcome, on the thread that runs the dispatcher."""
        self.add_each([(tunnel, settle)], op, timeout)

    def add_each(self, targets: Iterable[Tuple[Tunnel, Callable[[Any, Optional[BaseException]], None]]],
                 op: _Operation, timeout: Optional[float] = None) -> None:
        """``add(tunnel, op, settle, timeout)`` for each ``(tunnel, settle)``
        of ``targets``, in one go."""
        with self.lock:
            lanes = self._lanes
            for tunnel, settle in targets:
                lane = lanes.get(id(tunnel))
                if lane is None:
                    lane = lanes[id(tunnel)] = _Lane(tunnel)
                lane.jobs.append(_Job(lane, op, settle, timeout))
                self._unsettled += 1
                if not lane.scheduled:
                    lane.scheduled = True
                    self._ready.append(lane)
            notify = self._notify
        if notify is not None:
            notify(('wake',))

    @property
    def pending(self) -> int:
        return self._unsettled

    # --- driving
    def run(self) -> None:
        """Run until every job has settled."""
        # This thread reads the replies to its calls itself (ReplyReader):
        # their futures complete here and post their events without a
        # thread switch.  Other threads (connects, transfers, the broker for
        # transports that cannot be taken) post theirs and wake the reader.
        events: Deque[tuple] = collections.deque()
        reader = self._reader = ReplyReader()
        runner = threading.get_ident()

        def post(event):
            events.append(event)
            if threading.get_ident() != runner:
                reader.wake()

        self._begin(post)
        try:
            while True:
                wait = self._step()
                if wait is None:
                    break
                if not events:
                    reader.wait(wait)
                with self.lock:
                    while events:
                        self._handle(events.popleft())
        except BaseException:
            self._abandon()
            raise
        finally:
            self._end()
            self._reader = None
            reader.close()
        self._raise_callback_errors()

    async def arun(self) -> None:
        """``run()`` for a running event loop: the loop keeps running meanwhile."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

        self._begin(post)
        try:
            while True:
                wait = self._step()
                if wait is None:
                    break
                try:
                    event = await asyncio.wait_for(events.get(), wait)
                except asyncio.TimeoutError:
                    continue
                with self.lock:
                    self._handle(event)
                    while not events.empty():
                        self._handle(events.get_nowait())
        except BaseException:  # including cancellation of the awaiting task
            self._abandon()
            raise
        finally:
            self._end()
        self._raise_callback_errors()

    def _begin(self, notify):
        with self.lock:
            if self._notify is not None:
                raise RuntimeError('this %s is already running' % (self.what or 'dispatcher'))
            self._notify = notify
            self._settled = self._failed = 0
            self._progress = _Progress(self.what, self.show_progress)

    def _step(self) -> Optional[float]:
        """Start what can start.  Returns None when every job has settled,
        else how long to wait for the next event (until the next timer)."""
        with self.lock:
            self._fire_timers()
            self._pump()
            if self._unsettled == 0:
                return None
            wake = [self._timers[0][0]] if self._timers else []
            start_at = self._progress.starts_at()
            if start_at is not None:
                wake.append(start_at)
            return max(0.0, min(wake) - time.monotonic()) if wake else 60.0

    def _end(self):
        with self.lock:
            self._notify = None
            self._connect_limit = self.max_connect
            self._timers.clear()
            pool, self._pool = self._pool, None
            progress, self._progress = self._progress, None
        if pool is not None:
            pool.shutdown(wait=False)
        if progress is not None:
            progress.close()

    def _abandon(self):
        """Interrupted: forget every job (replies still coming are dropped)."""
        with self.lock:
            for lane in self._lanes.values():
                for job in lane.jobs:
                    job.settled = True
                    if job.future is not None:
                        job.future.cancel()
            self._lanes.clear()  # (the pipes lanes were reading go back when run() closes its reader)
            self._ready.clear()
            self._connect_wait.clear()
            self._busy = self._connecting = self._unsettled = 0
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    def _raise_callback_errors(self):
        errors, self._callback_errors = self._callback_errors, []
        if errors:
            for extra in errors[1:]:
                log.error('another callback failed too', exc_info=extra)
            raise errors[0]

    # --- scheduling (under lock)
    def _pump(self):
        while self._ready and self._busy < self.max_parallel:
            lane = self._ready.popleft()
            self._busy += 1
            self._next(lane)
        while self._connect_wait and self._connecting < self._connect_limit:
            self._start_connect(self._connect_wait.popleft())

    def _next(self, lane: _Lane, just_connected: bool = False):
        """Start the lane's next job, or give its slot back."""
        tunnel = lane.tunnel
        while lane.jobs:
            job = lane.jobs[0]
            failure = self.connect_failures.get(tunnel)
            if failure is not None:
                lane.jobs.popleft()
                self._settle(job, None, failure)
                continue
            if not just_connected and not getattr(tunnel, 'connected', True):
                self._connect_wait.append(lane)
                return
            self._start(job)
            return
        lane.scheduled = False
        self._busy -= 1
        del self._lanes[id(tunnel)]  # an idle tunnel costs the dispatcher nothing
        if lane.reading is not None:
            self._reader.give_back(lane.reading)
            lane.reading = None

    def _start(self, job: _Job, sent: Optional[concurrent.futures.Future] = None):
        """Start ``job``, or only follow it when it was ``sent`` with the connect."""
        tunnel = job.lane.tunnel
        notify = self._notify

        def settle(value, exc):
            notify(('settled', job, value, exc))

        try:
            if sent is not None:
                future = _settle_when_done(sent, settle)
            elif job.op.blocking:
                report = self._progress.reporter(tunnel.host) if self._progress is not None else None
                future = _settle_when_done(self._executor().submit(job.op.work, tunnel, report), settle)
            else:
                if self._reader is not None and job.lane.reading is None:
                    # Taken before the call goes out: the broker never sees the reply.
                    conn = getattr(tunnel, '_conn', None)
                    if conn is not None and not conn.closed and self._reader.take(conn):
                        job.lane.reading = conn
                future = job.op.work(tunnel, settle)
        except Exception as e:
            future = concurrent.futures.Future()
            future.set_exception(e)
            settle(None, e)
        job.future = future
        if job.timeout is not None:
            heapq.heappush(self._timers, (time.monotonic() + job.timeout, next(self._seq), 'deadline', job))

    def _start_connect(self, lane: _Lane):
        self._connecting += 1
        job = lane.jobs[0] if lane.jobs else None
        if job is not None and job.op.first_call is not None and hasattr(lane.tunnel, 'open_connection'):
            # The call goes with the connect; open_connection returns its CallFuture,
            # or None when it could not go before the agent's HELLO.
            future = self._executor().submit(lane.tunnel.open_connection, job.op.first_call)
        else:
            future = self._executor().submit(lane.tunnel.connect)
        notify = self._notify
        future.add_done_callback(lambda f: notify(('connected', lane, f, job)))

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # Threads start as work arrives: calls on connected tunnels need none.
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.max_parallel, thread_name_prefix='chopsticks-group')
        return self._pool

    def _handle(self, event: tuple):
        kind = event[0]
        if kind == 'settled':
            _, job, value, exc = event
            if job.settled:
                return  # it timed out earlier
            lane = job.lane
            lane.jobs.popleft()
            if isinstance(exc, concurrent.futures.CancelledError):
                exc = TunnelClosed('[%s] %s was cancelled' % (lane.tunnel.host, job.op.what))
            self._settle(job, value, exc)
            self._next(lane)
        elif kind == 'connected':
            self._connected(*event[1:])

    def _connected(self, lane: _Lane, future: concurrent.futures.Future, job: Optional[_Job]):
        self._connecting -= 1
        exc = future.exception()
        if exc is None:
            lane.attempts = 0
            self._connect_limit = min(self.max_connect, self._connect_limit + 1)
            opened = future.result()
            first = opened[1] if isinstance(opened, tuple) else None
            if first is None or job is None:
                self._next(lane, just_connected=True)
            elif job.settled:  # abandoned meanwhile: its reply is dropped
                first.cancel()
            else:
                self._start(job, first)
        elif _dropped_at_handshake(exc) and lane.attempts < CONNECT_RETRIES:
            lane.attempts += 1
            self._connect_limit = max(1, self._connect_limit // 2)
            delay = RETRY_BACKOFF * 2 ** (lane.attempts - 1) * random.uniform(0.5, 1.5)
            log.info('[%s] connection dropped during the handshake (sshd MaxStartups?); '
                     'retrying in %.1fs, at most %d connects at once', lane.tunnel.host, delay,
                     self._connect_limit)
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), 'retry', lane))
        else:
            lane.attempts = 0
            self.connect_failures[lane.tunnel] = exc
            self._next(lane)

    def _fire_timers(self):
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, item = heapq.heappop(timers)
            if kind == 'retry':
                self._connect_wait.appendleft(item)
            elif not item.settled and not item.future.done():
                self._expire(item)
        if self._progress is not None:
            self._progress.update(self._settled, self._settled + self._unsettled, self._failed)

    def _expire(self, job: _Job):
        lane = job.lane
        tunnel = lane.tunnel
        job.future.cancel()  # a call: its late reply is dropped
        if job.op.blocking:
            # A transfer cannot be abandoned half way: closing the tunnel aborts
            # it (files are renamed into place only when complete).
            tunnel.close()
        lane.jobs.popleft()
        self._settle(job, None, CallTimeout('[%s] %s did not finish within %ss'
                                            % (tunnel.host, job.op.what, job.timeout)))
        self._next(lane)

    def _settle(self, job: _Job, value: Any, exc: Optional[BaseException]):
        job.settled = True
        self._unsettled -= 1
        self._settled += 1
        if exc is not None:
            self._failed += 1
        try:
            job.settle(value, exc)
        except Exception as e:
            self._callback_errors.append(e)
        if self._progress is not None:
            self._progress.update(self._settled, self._settled + self._unsettled, self._failed)


def _dropped_at_handshake(exc: BaseException) -> bool:
    text = str(exc) + getattr(exc, 'stderr', '')
    return any(marker in text for marker in HANDSHAKE_DROPPED)


class _Progress(object):
    """A transient progress bar on stderr for an operation that runs longer
    than PROGRESS_DELAY, when stderr is a terminal and rich is installed:
    hosts done, failures, and the bytes that file transfers moved."""

    def __init__(self, what: str, enabled: bool):
        self.what = what or 'chopsticks'
        self.enabled = enabled
        self.start_at = time.monotonic() + PROGRESS_DELAY if enabled and _stderr_is_terminal() else None
        self.bar = None
        self.task = None
        self.lock = threading.Lock()   # transfers report bytes from their own threads
        self.transfers: Dict[str, Tuple[int, int]] = {}
        self.done = 0
        self.failed = 0

    def starts_at(self) -> Optional[float]:
        return self.start_at if self.bar is None else None

    def reporter(self, host: str) -> Any:
        """``progress=`` for one host's transfer (see _Operation)."""
        if self.start_at is None:
            return None if self.enabled else False

        def report(done, total):
            with self.lock:
                self.transfers[host] = (done, total)
                if self.bar is not None:
                    self.bar.update(self.task, completed=self._completed(), detail=self._detail())
        return report

    def _completed(self) -> float:
        # Hosts done, plus the fractions of the transfers under way: the bar moves.
        return self.done + sum(d / t for d, t in self.transfers.values() if 0 < d < t)

    def _detail(self) -> str:
        parts = []
        if self.transfers:
            from rich.filesize import decimal
            done = sum(d for d, _ in self.transfers.values())
            total = sum(t for _, t in self.transfers.values())
            parts.append('%s/%s' % (decimal(done), decimal(total)))
        if self.failed:
            parts.append('[red]%d failed[/]' % self.failed)
        return '  '.join(parts)

    def update(self, done: int, total: int, failed: int):
        if self.start_at is None:
            return
        with self.lock:
            self.done = done
            self.failed = failed
            if self.bar is None:
                if time.monotonic() < self.start_at or done >= total:
                    return
                self._open(total)
                if self.bar is None:
                    return
            self.bar.update(self.task, completed=self._completed(), total=total, detail=self._detail())

    def _open(self, total: int):
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
            )
            bar = Progress(
                SpinnerColumn(), TextColumn('{task.description}'), BarColumn(), MofNCompleteColumn(),
                TextColumn('hosts'), TextColumn('{task.fields[detail]}'), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True)
            self.task = bar.add_task(self.what, total=total, detail='')
            bar.start()
        except Exception:  # no rich, or another live display is running
            self.start_at = None
            return
        self.bar = bar

    def close(self):
        with self.lock:
            bar, self.bar = self.bar, None
            self.start_at = None
        if bar is not None:
            bar.stop()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# --- groups ---------------------------------------------------------------------------

def _tunnel_from_string(host: str, via: Optional[Tunnel] = None) -> Tunnel:
    extra = {} if via is None else {'via': via}
    try:
        from .plugins import tunnel_from_url
    except ImportError:
        from .tunnel import SSHTunnel
        return SSHTunnel(host, **extra)
    return tunnel_from_url(host, **extra)


def _is_tunnel(obj: Any) -> bool:
    return hasattr(obj, 'call_async') and hasattr(obj, 'host') and not isinstance(obj, Group)


def _tunnels_of(hosts: Any, via: Optional[Tunnel] = None) -> List[Tunnel]:
    """Tunnels from host strings, tunnels, groups, or an iterable of them,
    without repeating one; two different tunnels of one name are an error.
    Host strings become tunnels opened from ``via`` when it is given."""
    if isinstance(hosts, str) or _is_tunnel(hosts) or isinstance(hosts, Group):
        hosts = [hosts]
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
        elif _is_tunnel(item):
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
    ``'local'``, ``'sudo://user'``, ``'docker://name'``: see
    ``chopsticks.plugins.tunnel_from_url``) and groups.  Host names must be
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

    ``via=relay`` opens the tunnels of host strings from the host ``relay``
    (see ``chopsticks.relay``): the controller holds one connection, to the
    relay, which fans out to the hosts and serves them their imports.
    """

    def __init__(self, hosts: Iterable[Any], max_parallel: int = DEFAULT_MAX_PARALLEL,
                 timeout: Optional[float] = None, *, max_connect: int = DEFAULT_MAX_CONNECT,
                 progress: bool = True, via: Optional[Tunnel] = None):
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
        return self._run(_connect_op(), None)

    async def aconnect(self) -> GroupResult:
        for tunnel in self.tunnels:
            self._connect_errors.pop(tunnel, None)
        return await self._arun(_connect_op(), None)

    def close(self) -> None:
        """Stop every agent (tunnels reconnect if used again)."""
        self._connect_errors.clear()
        for tunnel in self.tunnels:
            tunnel.close()

    def __enter__(self) -> 'Group':
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- operations
    def call(self, fn: Callable, *args: Any, timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        """Run ``fn(*args, **kwargs)`` on every host: ``{host: value or ErrorResult}``.

        The call is pickled once for all hosts.  ``timeout`` (seconds, per
        host) overrides the group's.  To pass ``fn`` a keyword argument named
        ``timeout``, wrap it in ``functools.partial``.
        """
        return self._run(_call_op(fn, args, kwargs), timeout)

    async def acall(self, fn: Callable, *args: Any, timeout: Any = _GROUP_TIMEOUT,
                    **kwargs: Any) -> GroupResult:
        """``await group.acall(fn, ...)``: ``call`` without blocking the event loop."""
        return await self._arun(_call_op(fn, args, kwargs), timeout)

    def put(self, local_path: str, remote_path: Optional[str] = None, mode: int = 0o644, *,
            timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        """Copy a local file (or tree) to every host; ``{host: put's result dict}``.

        See ``chopsticks.files.put``: with no ``remote_path``, each host
        gets a temporary name.
        """
        return self._run(_put_op(local_path, remote_path, mode, kwargs), timeout)

    async def aput(self, local_path: str, remote_path: Optional[str] = None, mode: int = 0o644, *,
                   timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        return await self._arun(_put_op(local_path, remote_path, mode, kwargs), timeout)

    def fetch(self, remote_path: str, local_path: Optional[str] = None, *,
              timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        """Copy ``remote_path`` from every host; ``{host: fetch's result dict}``.

        ``local_path`` is a template in which ``{host}`` is replaced by each
        host's name (``'backup/{host}/passwd'``; missing directories are
        made); it must give each host its own path.  By default each host's
        copy goes to ``<new temporary directory>/<host>/<file name>``: the
        result's ``local_path`` says where.
        """
        return self._run(self._fetch_op(remote_path, local_path, kwargs), timeout)

    async def afetch(self, remote_path: str, local_path: Optional[str] = None, *,
                     timeout: Any = _GROUP_TIMEOUT, **kwargs: Any) -> GroupResult:
        return await self._arun(self._fetch_op(remote_path, local_path, kwargs), timeout)

    def _fetch_op(self, remote_path, local_path, kwargs):
        return _fetch_op(remote_path, _fetch_paths(self.tunnels, remote_path, local_path), kwargs)

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

    def _dispatcher(self, op: _Operation, timeout: Any) -> Tuple[_Dispatcher, Callable[[], GroupResult]]:
        if timeout is _GROUP_TIMEOUT:
            timeout = self.timeout
        dispatcher = _Dispatcher(self.max_parallel, self.max_connect, self.progress,
                                 self._connect_errors, op.what)
        results: Dict[str, Any] = {}
        dispatcher.add_each([(tunnel, functools.partial(_store, results, tunnel.host))
                             for tunnel in self.tunnels], op, timeout)
        return dispatcher, lambda: GroupResult((t.host, results[t.host]) for t in self.tunnels)

    def _run(self, op: _Operation, timeout: Any) -> GroupResult:
        dispatcher, results = self._dispatcher(op, timeout)
        dispatcher.run()
        return results()

    async def _arun(self, op: _Operation, timeout: Any) -> GroupResult:
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
        if _is_tunnel(other):
            return self._derive([other])
        return None

    def _binary(name: str, reflected: bool = False):
        def op(self, other):
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


def _store(results: Dict[str, Any], host: str, value: Any, exc: Optional[BaseException]) -> None:
    results[host] = value if exc is None else ErrorResult(host, exc)

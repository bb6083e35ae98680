"""The group scheduler: jobs on many tunnels, in order on each, tunnels in parallel.

:class:`chopsticks.group.Group` and :class:`chopsticks.queue.Queue` feed a
:class:`Dispatcher` with :class:`Operation` s, one :class:`Job` per tunnel,
and drive it with ``run()`` (or ``await arun()``).  What it guarantees:

* At most ``max_parallel`` tunnels are busy at once, and at most
  ``max_connect`` of them are connecting (connecting blocks, so a small pool
  of threads does it, created for the run and gone after it).
* sshd refuses bursts of unauthenticated connections (``MaxStartups``,
  10:30:100 by default: past 10 at once it starts dropping them).  A connect
  dropped during the key exchange is retried, up to ``CONNECT_RETRIES``
  times after a jittered backoff, and each drop halves the number of
  concurrent connects for the rest of the run (it grows back by one with
  each success).
* A tunnel whose connection failed is recorded in ``connect_failures`` and
  every later job on it fails at once with the same error.
* A job's ``timeout`` runs from when it starts on its tunnel (after the
  connect).  A call that overruns it is abandoned (its late reply dropped);
  a transfer is aborted by closing its tunnel.

Everything that happens on another thread (a connect finishing, a reply
arriving on the broker's thread, a transfer ending) only posts an event
(:class:`Settled`, :class:`Connected`, :class:`Wake`); the state changes on
the thread that drives the run, under ``lock``.

This module runs on Python 3.6 too (a relay host may fan out from there).
"""
import asyncio
import collections
import concurrent.futures
import enum
import heapq
import itertools
import logging
import random
import threading
import time
from typing import (
    TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple,
    Union,
)

from .replies import ReplyReader
from .errors import CallTimeout, TunnelClosed
from .fdlimit import check_descriptors
from .operations import Operation, Settle, settle_when_done

__all__ = [
    'Dispatcher', 'Connected', 'Settled', 'Wake', 'ConnectThrottle', 'Timers',
    'CONNECT_RETRIES', 'RETRY_BACKOFF', 'HANDSHAKE_DROPPED',
]

log = logging.getLogger('chopsticks')

CONNECT_RETRIES = 3         # extra attempts for a connect dropped at the handshake
RETRY_BACKOFF = 0.5         # seconds before the first retry; doubles, with jitter

# What ssh and paramiko say when sshd drops a connection before the key
# exchange, as it does past MaxStartups: worth retrying, unlike a refused port.
HANDSHAKE_DROPPED = (
    'kex_exchange_identification',
    'Error reading SSH protocol banner',
    'Connection reset by peer',
)

if TYPE_CHECKING:  # typing.Protocol is Python 3.8+; this module must import on 3.6
    from typing import Protocol

    class GroupTunnel(Protocol):
        """What the scheduler uses of a tunnel (chopsticks.tunnel.BaseTunnel has it all).

        A tunnel that also has ``direct_connection`` (a property: its own
        Connection or None) and ``open_connection(first_call)`` gets a
        call pickled once for all hosts, sent with its connect.
        """
        @property
        def host(self) -> str: ...
        @property
        def connected(self) -> bool: ...

        def connect(self) -> Any: ...
        def close(self) -> None: ...
        def call_async(self, fn: Callable[..., Any], *args: Any,
                       **kwargs: Any) -> 'concurrent.futures.Future[Any]': ...
else:
    GroupTunnel = Any


def dropped_at_handshake(exc: BaseException) -> bool:
    """Whether a connect failed the way sshd drops connections past MaxStartups."""
    text = str(exc) + str(getattr(exc, 'stderr', '') or '')
    return any(marker in text for marker in HANDSHAKE_DROPPED)


# --- jobs, lanes and events -------------------------------------------------------------

class Job(object):
    """One operation on one tunnel, and how it is going."""

    __slots__ = ('lane', 'op', 'settle', 'timeout', 'future', 'settled')

    def __init__(self, lane: 'Lane', op: Operation, settle: Settle, timeout: Optional[float]) -> None:
        self.lane = lane
        self.op = op
        self.settle = settle
        self.timeout = timeout
        self.future: Any = None      # the handle of the work under way
        self.settled = False


class Lane(object):
    """The jobs for one tunnel, run one after the other."""

    __slots__ = ('tunnel', 'jobs', 'scheduled', 'attempts', 'reading', 'direct')

    def __init__(self, tunnel: GroupTunnel) -> None:
        self.tunnel = tunnel
        self.reading: Any = None  # the connection whose replies the dispatcher's thread reads
        self.jobs: Deque[Job] = collections.deque()
        self.scheduled = False  # waiting for a slot, or holding one
        self.attempts = 0       # connects dropped at the handshake, in a row
        # Checked once, not per call: chopsticks' own tunnels have it (a
        # relayed one's is None); they take calls pickled once for every host.
        self.direct = hasattr(type(tunnel), 'direct_connection')


class Settled(NamedTuple):
    """A job's work finished (on any thread)."""
    job: Job
    value: Any
    exc: Optional[BaseException]


class Connected(NamedTuple):
    """A lane's connect finished; ``job`` was sent with it when its op has a first_call."""
    lane: Lane
    future: 'concurrent.futures.Future[Any]'
    job: Optional[Job]


class Wake(NamedTuple):
    """Jobs were added: look again."""


Event = Union[Settled, Connected, Wake]


class TimerKind(enum.Enum):
    RETRY = 'retry'         # a lane connects again
    DEADLINE = 'deadline'   # a job's timeout


class Timers(object):
    """Deadlines of jobs and retries of connects, soonest first."""

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, TimerKind, Any]] = []
        self._seq = itertools.count()  # ties fire in the order they were set

    def set(self, delay: float, kind: TimerKind, item: Any) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), kind, item))

    def next_at(self) -> Optional[float]:
        """When the soonest timer fires (time.monotonic()), or None."""
        return self._heap[0][0] if self._heap else None

    def due(self) -> Iterator[Tuple[TimerKind, Any]]:
        """Pop the timers whose time has come."""
        now = time.monotonic()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, kind, item = heapq.heappop(heap)
            yield kind, item

    def clear(self) -> None:
        self._heap.clear()


class ConnectThrottle(object):
    """How many lanes may connect at once: the MaxStartups policy.

    Up to ``max_connect``; each connect dropped at the handshake halves the
    limit (down to 1) and each connect that succeeds adds one back.  Lanes
    wait in ``waiting`` for their turn; a retried lane goes first.
    """

    def __init__(self, max_connect: int) -> None:
        self.max_connect = max_connect
        self.limit = max_connect
        self.connecting = 0
        self.waiting: Deque[Lane] = collections.deque()

    def next_lane(self) -> Optional[Lane]:
        """A waiting lane that may start connecting now (counted as connecting), or None."""
        if self.waiting and self.connecting < self.limit:
            self.connecting += 1
            return self.waiting.popleft()
        return None

    def succeeded(self) -> None:
        self.connecting -= 1
        self.limit = min(self.max_connect, self.limit + 1)

    def failed(self) -> None:
        self.connecting -= 1

    def dropped(self, lane: Lane) -> float:
        """A connect dropped at the handshake: the seconds before ``lane`` retries."""
        self.connecting -= 1
        lane.attempts += 1
        self.limit = max(1, self.limit // 2)
        return RETRY_BACKOFF * 2 ** (lane.attempts - 1) * random.uniform(0.5, 1.5)

    def reset(self) -> None:
        """Forget the waiting lanes and the run's drops."""
        self.waiting.clear()
        self.connecting = 0
        self.limit = self.max_connect


class _NoProgress(object):
    """What a dispatcher shows without a progress factory: nothing."""

    def starts_at(self) -> Optional[float]:
        return None

    def reporter(self, host: str) -> Any:
        return None

    def update(self, done: int, total: int, failed: int) -> None:
        pass

    def close(self) -> None:
        pass


# --- the dispatcher ---------------------------------------------------------------------

class Dispatcher(object):
    """Runs jobs on many tunnels: in order on each tunnel, tunnels in parallel.

    ``progress(what, enabled)`` makes the run's progress display (see
    chopsticks.group's bar): ``starts_at()``, ``reporter(host)``,
    ``update(done, total, failed)`` and ``close()``.  ``connect_failures``
    is shared with the caller: tunnels in it fail at once.

    State changes only under ``lock``, on the thread that drives ``run()``
    (or the event loop of ``arun()``), or in ``add()``.  Futures completing
    on other threads only post an event.
    """

    def __init__(self, max_parallel: int, max_connect: int, progress: bool = False,
                 connect_failures: Optional[Dict[Any, BaseException]] = None,
                 what: str = '', progress_factory: Optional[Callable[[str, bool], Any]] = None) -> None:
        if max_parallel < 1 or max_connect < 1:
            raise ValueError('max_parallel and max_connect must be at least 1')
        self.max_parallel = max_parallel
        self.max_connect = max_connect
        self.show_progress = progress
        self.what = what
        self.connect_failures: Dict[Any, BaseException] = {} if connect_failures is None else connect_failures
        self.lock = threading.RLock()
        self._progress_factory = progress_factory
        self._lanes: Dict[int, Lane] = {}
        self._ready: Deque[Lane] = collections.deque()         # waiting for a slot
        self._connects = ConnectThrottle(max_connect)  # lanes holding a slot, to connect
        self._busy = 0          # lanes holding a slot
        self._timers = Timers()
        self._unsettled = 0
        self._settled = 0
        self._failed = 0
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._notify: Optional[Callable[[Event], None]] = None
        self._progress: Any = None
        self._callback_errors: List[BaseException] = []
        self._reader: Optional[ReplyReader] = None  # while run() runs

    # --- feeding
    def add(self, tunnel: GroupTunnel, op: Operation, settle: Settle,
            timeout: Optional[float] = None) -> None:
        """Queue ``op`` on ``tunnel``; ``settle(value, exc)`` is called once
        with its outcome, on the thread that runs the dispatcher."""
        self.add_each([(tunnel, settle)], op, timeout)

    def add_each(self, targets: Iterable[Tuple[GroupTunnel, Settle]], op: Operation,
                 timeout: Optional[float] = None) -> None:
        """``add(tunnel, op, settle, timeout)`` for each ``(tunnel, settle)``
        of ``targets``, in one go."""
        with self.lock:
            lanes = self._lanes
            for tunnel, settle in targets:
                lane = lanes.get(id(tunnel))
                if lane is None:
                    lane = lanes[id(tunnel)] = Lane(tunnel)
                lane.jobs.append(Job(lane, op, settle, timeout))
                self._unsettled += 1
                if not lane.scheduled:
                    lane.scheduled = True
                    self._ready.append(lane)
            notify = self._notify
        if notify is not None:
            notify(Wake())

    @property
    def pending(self) -> int:
        """Jobs added and not settled yet."""
        return self._unsettled

    # --- driving
    def run(self) -> None:
        """Run until every job has settled."""
        self._check_descriptors()
        _run_here(self)

    async def arun(self) -> None:
        """``run()`` for a running event loop: the loop keeps running meanwhile."""
        self._check_descriptors()
        await _run_in_loop(self)

    def stop(self) -> None:
        """From any thread: abandon every job not settled yet (late replies
        are dropped, jobs not started never start); ``run()`` returns soon."""
        with self.lock:
            notify = self._notify
            self._abandon()
            self._timers.clear()  # no retried connect either
        if notify is not None:
            notify(Wake())

    def _check_descriptors(self) -> None:
        # A group too big for RLIMIT_NOFILE fails here, not host by host.
        with self.lock:
            tunnels = [lane.tunnel for lane in self._lanes.values()]
        check_descriptors(tunnels, self.max_connect, self.what or 'connecting')

    def _begin(self, notify: Callable[[Event], None]) -> None:
        with self.lock:
            if self._notify is not None:
                raise RuntimeError('this %s is already running' % (self.what or 'dispatcher'))
            self._notify = notify
            self._settled = self._failed = 0
            factory = self._progress_factory
            self._progress = factory(self.what, self.show_progress) if factory else _NoProgress()

    def _step(self) -> Optional[float]:
        """Start what can start.  Returns None when every job has settled,
        else how long to wait for the next event (until the next timer)."""
        with self.lock:
            self._fire_timers()
            self._pump()
            if self._unsettled == 0:
                return None
            next_timer = self._timers.next_at()
            wake = [] if next_timer is None else [next_timer]
            start_at = self._progress.starts_at()
            if start_at is not None:
                wake.append(start_at)
            return max(0.0, min(wake) - time.monotonic()) if wake else 60.0

    def _end(self) -> None:
        with self.lock:
            self._notify = None
            self._connects.reset()
            self._timers.clear()
            pool, self._pool = self._pool, None
            progress, self._progress = self._progress, None
        if pool is not None:
            pool.shutdown(wait=False)
        if progress is not None:
            progress.close()

    def _abandon(self) -> None:
        """Interrupted: forget every job (replies still coming are dropped)."""
        with self.lock:
            for lane in self._lanes.values():
                for job in lane.jobs:
                    job.settled = True
                    if job.future is not None:
                        job.future.cancel()
            self._lanes.clear()  # (the pipes lanes were reading go back when run() closes its reader)
            self._ready.clear()
            self._connects.reset()
            self._busy = self._unsettled = 0
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    def _raise_callback_errors(self) -> None:
        errors, self._callback_errors = self._callback_errors, []
        if errors:
            for extra in errors[1:]:
                log.error('another callback failed too', exc_info=extra)
            raise errors[0]

    # --- scheduling (under lock)
    def _pump(self) -> None:
        while self._ready and self._busy < self.max_parallel:
            lane = self._ready.popleft()
            self._busy += 1
            self._next(lane)
        connecting = self._connects.next_lane()
        while connecting is not None:
            self._start_connect(connecting)
            connecting = self._connects.next_lane()

    def _next(self, lane: Lane, just_connected: bool = False) -> None:
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
                self._connects.waiting.append(lane)
                return
            self._start(job)
            return
        lane.scheduled = False
        self._busy -= 1
        del self._lanes[id(tunnel)]  # an idle tunnel costs the dispatcher nothing
        if lane.reading is not None:
            if self._reader is not None:
                self._reader.give_back(lane.reading)
            lane.reading = None

    def _start(self, job: Job, sent: Optional['concurrent.futures.Future[Any]'] = None) -> None:
        """Start ``job``, or only follow it when it was ``sent`` with the connect."""
        lane = job.lane
        tunnel = lane.tunnel
        notify = self._notify
        assert notify is not None

        def settle(value: Any, exc: Optional[BaseException]) -> None:
            notify(Settled(job, value, exc))

        future: Any
        try:
            if sent is not None:
                future = settle_when_done(sent, settle)
            elif job.op.blocking:
                report = self._progress.reporter(tunnel.host) if self._progress is not None else None
                future = settle_when_done(self._executor().submit(job.op.work, tunnel, report), settle)
            else:
                conn = tunnel.direct_connection if lane.direct else None  # type: ignore[attr-defined]
                if self._reader is not None and lane.reading is None and conn is not None and not conn.closed:
                    # Taken before the call goes out: the broker never sees the reply.
                    if self._reader.take(conn):
                        lane.reading = conn
                future = job.op.work(tunnel, conn, settle)
        except Exception as e:
            future = concurrent.futures.Future()
            future.set_exception(e)
            settle(None, e)
        job.future = future
        if job.timeout is not None:
            self._timers.set(job.timeout, TimerKind.DEADLINE, job)

    def _start_connect(self, lane: Lane) -> None:
        job = lane.jobs[0] if lane.jobs else None
        if job is not None and job.op.first_call is not None and lane.direct:
            # The call goes with the connect; open_connection returns its CallFuture,
            # or None when it could not go before the agent's HELLO.
            future = self._executor().submit(lane.tunnel.open_connection,  # type: ignore[attr-defined]
                                             job.op.first_call)
        else:
            future = self._executor().submit(lane.tunnel.connect)
            job = None
        notify = self._notify
        assert notify is not None
        future.add_done_callback(lambda f: notify(Connected(lane, f, job)))

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # Threads start as work arrives: calls on connected tunnels need none.
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.max_parallel, thread_name_prefix='chopsticks-group')
        return self._pool

    def _handle(self, event: Event) -> None:
        if type(event) is Settled:
            job = event.job
            if job.settled:
                return  # it timed out earlier
            lane = job.lane
            lane.jobs.popleft()
            exc = event.exc
            if isinstance(exc, concurrent.futures.CancelledError):
                exc = TunnelClosed('[%s] %s was cancelled' % (lane.tunnel.host, job.op.what))
            self._settle(job, event.value, exc)
            self._next(lane)
        elif type(event) is Connected:
            self._connected(event)

    def _connected(self, event: Connected) -> None:
        lane, future, job = event
        exc = future.exception()
        if exc is None:
            lane.attempts = 0
            self._connects.succeeded()
            first = future.result()[1] if job is not None else None
            if first is None or job is None:
                self._next(lane, just_connected=True)
            elif job.settled:  # abandoned meanwhile: its reply is dropped
                first.cancel()
            else:
                self._start(job, first)
        elif dropped_at_handshake(exc) and lane.attempts < CONNECT_RETRIES:
            delay = self._connects.dropped(lane)
            log.info('[%s] connection dropped during the handshake (sshd MaxStartups?); '
                     'retrying in %.1fs, at most %d connects at once', lane.tunnel.host, delay,
                     self._connects.limit)
            self._timers.set(delay, TimerKind.RETRY, lane)
        else:
            self._connects.failed()
            lane.attempts = 0
            self.connect_failures[lane.tunnel] = exc
            self._next(lane)

    def _fire_timers(self) -> None:
        for kind, item in self._timers.due():
            if kind is TimerKind.RETRY:
                self._connects.waiting.appendleft(item)
            elif not item.settled and not item.future.done():
                self._expire(item)
        if self._progress is not None:
            self._progress.update(self._settled, self._settled + self._unsettled, self._failed)

    def _expire(self, job: Job) -> None:
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

    def _settle(self, job: Job, value: Any, exc: Optional[BaseException]) -> None:
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


# --- the two drivers: the caller's thread, or an asyncio event loop ----------------------

def _run_here(dispatcher: Dispatcher) -> None:
    """Dispatcher.run: this thread waits for events, and reads replies meanwhile."""
    # This thread reads the replies to its calls itself (ReplyReader):
    # their futures complete here and post their events without a
    # thread switch.  Other threads (connects, transfers, the broker for
    # transports that cannot be taken) post theirs and wake the reader.
    events: Deque[Event] = collections.deque()
    reader = dispatcher._reader = ReplyReader()
    runner = threading.get_ident()

    def post(event: Event) -> None:
        events.append(event)
        if threading.get_ident() != runner:
            reader.wake()

    dispatcher._begin(post)
    try:
        while True:
            wait = dispatcher._step()
            if wait is None:
                break
            if not events:
                reader.wait(wait)
            with dispatcher.lock:
                while events:
                    dispatcher._handle(events.popleft())
    except BaseException:
        dispatcher._abandon()
        raise
    finally:
        dispatcher._end()
        dispatcher._reader = None
        reader.close()
    dispatcher._raise_callback_errors()


async def _run_in_loop(dispatcher: Dispatcher) -> None:
    """Dispatcher.arun: events arrive through the loop; the loop runs meanwhile."""
    loop = asyncio.get_running_loop()
    events: 'asyncio.Queue[Event]' = asyncio.Queue()

    def post(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    dispatcher._begin(post)
    try:
        while True:
            wait = dispatcher._step()
            if wait is None:
                break
            try:
                event = await asyncio.wait_for(events.get(), wait)
            except asyncio.TimeoutError:
                continue
            with dispatcher.lock:
                dispatcher._handle(event)
                while not events.empty():
                    dispatcher._handle(events.get_nowait())
    except BaseException:  # including cancellation of the awaiting task
        dispatcher._abandon()
        raise
    finally:
        dispatcher._end()
    dispatcher._raise_callback_errors()

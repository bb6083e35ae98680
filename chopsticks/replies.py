"""Replies: the handlers that pair the agent's answers with the calls waiting
for them, and the reader that lets a caller's thread read its own.

A Connection keeps ``pending``: request id -> handler.  The thread that
reads the transport (the broker, or a caller: see ReplyReader and
Connection.read_for) gives each reply frame to its handler's
``frame(op, payload)``, which returns True once the call is over; a lost
connection calls ``fail(exc)`` on every handler still pending.  One handler
class per kind of call:

- ``ReplyHandler``: the one reply a synchronous ``call`` waits for;
- ``CallFuture``: ``call_async``'s future, which reads its own reply when waited on;
- ``ReplyCallback``: a reply handed to a callback (the group dispatcher);
- ``IterHandler``: a remote generator's items, with credit-based flow control;
- ``StreamHandler``: a call fed by an input stream, with a send window.
"""
import collections
import concurrent.futures
import os
import select
import sys
import threading
import time
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, Optional, Set,
                    Tuple, Union)

from . import codec, wire
from .broker import on_broker_thread
from .errors import CallTimeout, RemoteException, TunnelClosed
from .serialize import describe
from .transport import FileRegion, TakeResult, reading_buffer

if sys.version_info >= (3, 8):
    from typing import Protocol
else:  # a relay host's older Python
    Protocol = object

if TYPE_CHECKING:
    from .connection import Connection
    from .transport import DirectReading

ITER_CREDIT_BATCH = 32      # generator items acknowledged at a time
ITER_WINDOW = 64            # items a remote generator may send ahead of credit (the agent's ITER_WINDOW)
STREAM_WINDOW = 8 << 20     # input-stream bytes in flight before the sender waits
STREAM_CHUNK = 1 << 20      # the largest DATA frame we send
STREAM_ABORT_WAIT = 5.0     # seconds a failed input stream waits for the host to clean up

_PENDING = concurrent.futures._base.PENDING  # type: ignore[attr-defined]  # see CallFuture
_DONE = (concurrent.futures._base.CANCELLED,  # type: ignore[attr-defined]
         concurrent.futures._base.CANCELLED_AND_NOTIFIED,  # type: ignore[attr-defined]
         concurrent.futures._base.FINISHED)  # type: ignore[attr-defined]

What = Union[str, Callable[..., Any]]  # a call's function, or a description of it


def name_of(what: What) -> str:
    """``what`` for an error message (a function is described only then)."""
    return what if isinstance(what, str) else describe(what)


def remote_exception(host: str, payload: Any) -> RemoteException:
    """The RemoteException an ERROR frame describes; ValueError if it does not."""
    info = codec.decode(payload)
    if not isinstance(info, dict):
        raise ValueError('bad error reply')
    return RemoteException(host, str(info.get('type')), str(info.get('msg')),
                           str(info.get('traceback') or ''))


Settle = Callable[[Any, Optional[BaseException]], None]  # (value, exc): exactly one is set


class Settles(Protocol):
    """Anything a reader can wait for."""
    def done(self) -> bool: ...


class Handler(Protocol):
    """What a Connection's ``pending`` holds: the handler of one call's replies."""
    # Whether frame() decodes the payload: then the connection hands a large
    # one to its decode thread rather than stall a thread that reads every
    # tunnel (see Connection.dispatch).  False: frame() only queues the bytes.
    decodes_in_frame: bool

    def frame(self, op: int, payload: Union[bytes, memoryview]) -> bool:
        """Handle a reply frame (RESULT, ERROR, ITEM, END or CREDIT); True
        once the call is over and its id may be forgotten."""

    def fail(self, exc: BaseException) -> None:
        """The connection was lost (``exc`` says how) before the call ended."""


class _OneReply(object):
    """Handling of a call's one reply, RESULT or ERROR: ``frame`` and ``fail``
    settle it through ``settle(value, exc)``; ``conn`` names the host in errors."""
    __slots__ = ()
    conn: 'Connection'
    decodes_in_frame = True

    def settle(self, value: Any, exc: Optional[BaseException]) -> None:
        raise NotImplementedError

    def frame(self, op, payload):
        if op == wire.RESULT:
            self.settle(codec.decode(payload), None)
        elif op == wire.ERROR:
            self.settle(None, remote_exception(self.conn.host, payload))
        else:
            return False
        return True

    def fail(self, exc):
        self.settle(None, exc)


class CallFuture(_OneReply, concurrent.futures.Future):
    """The future of a call, and the handler of its reply.

    A thread waiting for the result reads the reply itself, as
    Connection.call does, rather than being woken for it.

    The futures of one connection share one Condition: Future.__init__
    makes one per future, eight objects for the garbage collector, whose
    collections took a third of the controller's time with 20,000 calls in
    flight.  ``concurrent.futures.wait`` and ``as_completed`` take it once
    per future (it is re-entrant), and a waiter woken for another future's
    reply waits again (``_wait``).
    """

    def __init__(self, conn, what):
        # What Future.__init__ sets, but the Condition (test_calls checks
        # that no field is missing on this Python).
        self._condition = conn.futures_condition
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks = []
        self.conn = conn
        self.what = what  # the function, described only if an error needs it

    def settle(self, value, exc):
        _settle(self, value, exc)

    def done(self):
        return self._state in _DONE  # one attribute read: no need for the shared lock

    def result(self, timeout=None):
        if not self.done():
            timeout = self._wait(self.conn.read_for(self, timeout))
        return super().result(timeout)

    def exception(self, timeout=None):
        if not self.done():
            timeout = self._wait(self.conn.read_for(self, timeout))
        return super().exception(timeout)

    def _wait(self, timeout):
        """Wait until done, or ``timeout`` (None: forever) passes; return 0
        so that Future's own wait, which wakes only once, waits no more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not self.done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._condition.wait(left)
        return 0


class CallHandler(object):
    """A call's reply, for handlers that do more than settle its future."""
    __slots__ = ('conn', 'future', 'what')
    decodes_in_frame = True

    def __init__(self, conn, what):
        self.conn = conn
        self.what = what
        self.future = CallFuture(conn, what)

    def frame(self, op, payload):
        return self.future.frame(op, payload)

    def fail(self, exc):
        self.future.fail(exc)


class ReplyCallback(_OneReply):
    """A call's one reply, handed to ``callback(value, exc)`` on the thread
    that reads it: lighter than a CallFuture, for callers that need no
    future (the group dispatcher).  ``cancel()`` drops a late reply."""
    __slots__ = ('conn', 'what', 'callback', 'rid')

    def __init__(self, conn, what, callback):
        self.conn = conn
        self.what = what
        self.callback = callback
        self.rid: Any = None  # the request id, once sent

    def settle(self, value, exc):
        callback, self.callback = self.callback, None
        if callback is not None:
            callback(value, exc)

    def done(self):
        return self.callback is None

    def cancel(self):
        self.callback = None
        self.conn.pending.pop(self.rid, None)
        return True


class ReplyHandler(_OneReply):
    """The one reply a synchronous call waits for (see Connection.call).

    Lighter than a Future: a call that reads its own reply sets it on its own
    thread, so only a lost connection settles it from another one.
    """
    __slots__ = ('conn', 'what', 'outcome', 'settled')

    def __init__(self, conn, what):
        self.conn = conn
        self.what = what
        self.outcome = None  # (value, exception) once settled
        self.settled = threading.Lock()
        self.settled.acquire()

    def done(self):
        return self.outcome is not None

    def settle(self, value, exc):
        if self.outcome is None:
            self.outcome = (value, exc)
            try:
                self.settled.release()
            except RuntimeError:
                pass  # settled at the same moment from another thread

    def wait(self, timeout):
        """True once settled; False if ``timeout`` seconds (None: forever) pass first."""
        return self.outcome is not None or \
            self.settled.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))


def _settle(future, result, exc):
    try:
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled, or already failed by a lost connection


class IterHandler(object):
    """Items of a remote generator, queued for the consuming thread.

    Items are kept as the bytes that came and decoded by the consumer
    (``each``), never on the thread that reads the transport, which may
    serve every tunnel (the broker).  The host may run ITER_WINDOW items
    ahead of what was acknowledged: one more is a ProtocolError for the
    tunnel, not controller memory (a host that ignored credit grew it from
    25 MB to 3 GB).
    """

    decodes_in_frame = False  # see Handler

    def __init__(self, conn, what):
        self.conn = conn
        self.what = what
        # (payload, op) as they came (ITEM, END, ERROR); op None: payload is why the tunnel ended
        self.items: Deque[Tuple[Any, Optional[int]]] = collections.deque()
        self.cond = threading.Condition(threading.Lock())
        self.unacknowledged = 0  # items received and not yet given credit back for

    def frame(self, op, payload):
        if op not in (wire.ITEM, wire.END, wire.ERROR):
            return False
        with self.cond:
            if op == wire.ITEM:
                self.unacknowledged += 1
                if self.unacknowledged > ITER_WINDOW:
                    raise ValueError('%s sent more than %d items without waiting for credit'
                                     % (name_of(self.what), ITER_WINDOW))
            self.items.append((payload, op))
            self.cond.notify()
        return op != wire.ITEM

    def fail(self, exc):
        with self.cond:
            self.items.append((exc, None))
            self.cond.notify()

    def next(self, timeout):
        with self.cond:
            if not self.cond.wait_for(lambda: self.items, timeout):
                raise CallTimeout('[%s] no item from %s within %ss'
                                  % (self.conn.host, name_of(self.what), timeout))
            return self.items.popleft()

    def acknowledge(self, rid: int, consumed: int) -> None:
        """Give the host credit for ``consumed`` more items."""
        with self.cond:  # before it can send them: frame() counts them
            self.unacknowledged -= consumed
        self.conn.send(rid, wire.CREDIT, codec.encode(consumed))

    def each(self, rid: int, timeout: Optional[float]) -> Iterator[Any]:
        """The items of call ``rid`` as they come, granting the host credit
        for more every ITER_CREDIT_BATCH; cancels the call if left early."""
        conn = self.conn
        consumed = 0
        finished = False
        try:
            while True:
                payload, op = self.next(timeout)
                if op is None:  # the connection was lost
                    finished = True
                    raise payload
                if op == wire.END:
                    finished = True
                    return
                try:  # here, not on the thread that read it (see the class docstring)
                    value = codec.decode(payload) if op == wire.ITEM else \
                        remote_exception(conn.host, payload)
                except (codec.DecodeError, KeyError, TypeError, ValueError) as e:
                    finished = True
                    raise conn.invalid_data(e)
                if op == wire.ERROR:
                    finished = True
                    raise value
                yield value
                consumed += 1
                if consumed >= ITER_CREDIT_BATCH:
                    self.acknowledge(rid, consumed)
                    consumed = 0
        finally:
            if not finished:
                conn.pending.pop(rid, None)
                try:
                    conn.send(rid, wire.CANCEL, b'')
                except TunnelClosed:
                    pass


class StreamHandler(CallHandler):
    """A call fed by an input stream: tracks how many bytes the remote consumed."""

    __slots__ = ('in_flight', 'cond')

    def __init__(self, conn, what):
        super().__init__(conn, what)
        self.in_flight = 0
        self.cond = threading.Condition(threading.Lock())

    def frame(self, op, payload):
        if op == wire.CREDIT:
            with self.cond:
                self.in_flight -= codec.decode(payload)
                self.cond.notify()
            return False
        done = super().frame(op, payload)
        with self.cond:
            self.cond.notify()
        return done

    def fail(self, exc):
        super().fail(exc)
        with self.cond:
            self.cond.notify()

    def pour(self, rid: int, chunks: Iterable[Any], timeout: Optional[float]) -> Any:
        """Send ``chunks`` (bytes-like, or FileRegions) to call ``rid`` in
        DATA frames, at most STREAM_WINDOW bytes ahead of the host; return
        the call's value."""
        conn = self.conn
        future = self.future
        cond = self.cond
        pieces: Iterator[Any] = iter(())
        try:
            with conn.wide_pipe('send'):
                for chunk in chunks:
                    if type(chunk) is FileRegion:
                        pieces = (FileRegion(chunk.fd, chunk.offset + start,
                                             min(STREAM_CHUNK, chunk.length - start))
                                  for start in range(0, chunk.length, STREAM_CHUNK))
                    else:
                        try:
                            view = memoryview(chunk).cast('B')
                        except TypeError:
                            raise TypeError(
                                '[%s] call_stream(%s): each chunk must be bytes-like or a '
                                'FileRegion, not %s%s' % (
                                    conn.host, name_of(self.what), type(chunk).__name__,
                                    ' (chunks is an iterable of chunks: pass [data], not data)'
                                    if isinstance(chunk, int) else '')) from None
                        pieces = (view[start:start + STREAM_CHUNK]
                                  for start in range(0, len(view), STREAM_CHUNK))
                    for piece in pieces:
                        with cond:
                            cond.wait_for(lambda: self.in_flight < STREAM_WINDOW or future.done())
                            if future.done():
                                break
                            self.in_flight += len(piece)
                        if type(piece) is FileRegion:
                            conn.send_region(rid, piece)
                        else:
                            conn.send_parts(rid, wire.DATA, [piece])
                    if future.done():
                        break
        except BaseException as e:
            self._end(rid, '%s: %s' % (type(e).__name__, e))
            if isinstance(e, Exception):
                # The host undoes what it did (a put removes its temp file)
                # when it reads the abort: a caller who sees this error finds
                # nothing left.  Not for Ctrl-C, which leaves at once.
                try:
                    conn.wait(future, STREAM_ABORT_WAIT, self.what)
                except Exception:
                    pass
            raise
        self._end(rid, None)
        return conn.wait(future, timeout, self.what)

    def _end(self, rid, error):
        if not self.conn.closed:
            self.conn.send(rid, wire.DATA_END, codec.encode(error))


class ReplyReader(object):
    """A thread that reads, itself, the replies to calls it made on many connections.

    The group dispatcher uses it (see Connection.call for one connection):
    replies settle their futures on the waiting thread instead of the
    broker's, so no reply costs a thread switch, nor two threads contending
    for the GIL.  Connections whose transport cannot be taken (paramiko,
    relays) stay with the broker; ``wake()`` lets any other thread interrupt
    ``wait()``.
    """

    def __init__(self) -> None:
        self.poller = select.poll()
        self.taken: Dict[int, Connection] = {}  # stdout fd -> connection
        self.fds: Dict[Connection, int] = {}    # connection -> stdout fd
        self.borrowed: Set[Connection] = set()  # already read by an outer reader here
        self.wake_r, self.wake_w = os.pipe()
        # wake() may come from another thread after close(), when a late
        # event is posted (a connect that outlived its call's timeout):
        # it must not write to the closed fd's number, now maybe another file's.
        self.wake_lock = threading.Lock()
        self.closed = False
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poller.register(self.wake_r, select.POLLIN)

    def take(self, conn: 'Connection') -> bool:
        """Read ``conn``'s replies on this thread from now on, if it can be done."""
        if conn in self.fds:
            return True
        taken = conn.take_reading()  # a relayed connection's: always REFUSED
        if taken is TakeResult.REFUSED:
            return False
        if taken is TakeResult.NESTED:
            self.borrowed.add(conn)  # an outer reader on this thread gives it back
        fd = conn.direct.stdout.fileno()  # type: ignore[union-attr]  # TAKEN or NESTED: direct
        self.taken[fd] = conn
        self.fds[conn] = fd
        self.poller.register(fd, select.POLLIN)
        return True

    def give_back(self, conn: 'Connection') -> None:
        fd = self.fds.pop(conn, None)
        if fd is not None:
            del self.taken[fd]
            self.poller.unregister(fd)
            if conn in self.borrowed:
                self.borrowed.discard(conn)
            else:
                conn.give_back_reading()

    def wait(self, timeout: Optional[float]) -> None:
        """Read and dispatch what arrives within ``timeout`` seconds, or until woken."""
        ready = self.poller.poll(None if timeout is None else timeout * 1000.0)
        buf = reading_buffer()
        for fd, _ in ready:
            if fd == self.wake_r:
                try:
                    os.read(fd, 4096)
                except BlockingIOError:
                    pass
                continue
            conn = self.taken.get(fd)
            if conn is not None and not conn.direct.read_once(conn, buf):  # type: ignore[union-attr]
                self.give_back(conn)  # EOF: the connection is lost

    def wake(self) -> None:
        with self.wake_lock:
            if self.closed:
                return
            try:
                os.write(self.wake_w, b'.')
            except BlockingIOError:
                pass  # already awake

    def close(self) -> None:
        for conn in list(self.fds):
            self.give_back(conn)
        with self.wake_lock:
            self.closed = True
            os.close(self.wake_r)
            os.close(self.wake_w)


def waiting_for_itself(host: str, what: What) -> RuntimeError:
    """The error for a wait on the broker thread for a reply that thread would read."""
    # The broker reads this tunnel's replies, and it is the thread that
    # would wait: every tunnel would stop with it.
    return RuntimeError(
        '[%s] cannot wait for %s from a callback running on chopsticks\' I/O thread: '
        'that thread reads this tunnel\'s replies, so it would wait for itself and stop '
        'every tunnel; use call_async, or wait from another thread' % (host, name_of(what)))


_reading_alone = threading.local()  # .conn: the one connection this thread reads (read_until_done)


def reads_alone(conn: 'Connection') -> bool:
    """Whether this thread reads ``conn`` and no other tunnel: a caller
    waiting for its own reply, which may as well decode it itself."""
    return getattr(_reading_alone, 'conn', None) is conn


class Reading(object):
    """Who reads one connection's replies: the broker, or the thread waiting
    for one, when the transport can be read directly (``conn.direct``).
    A Connection binds these methods as its own (``take_reading``...)."""

    def __init__(self, conn: 'Connection') -> None:
        self.conn = conn
        # Used only once take() said TAKEN or NESTED, when it is not None.
        self.direct: DirectReading = conn.direct  # type: ignore[assignment]

    def take(self) -> TakeResult:
        """This thread reads the replies from now on, if the transport allows
        it (see TakeResult)."""
        direct = self.direct
        return TakeResult.REFUSED if direct is None else direct.take_stdout()

    def give_back(self) -> None:
        """The broker reads the replies again (after ``take`` was TAKEN)."""
        # Parked, so a next call takes it back cheaply; but if another thread's
        # request went out meanwhile, the broker reads its reply.  (The state
        # is PARKED before pending is looked at, and Connection.request does
        # the reverse: one of us sees the other.)
        direct = self.direct
        direct.give_back_stdout()
        if self.conn.pending:
            direct.unpark()

    def read_for(self, future: Settles, timeout: Optional[float]) -> Optional[float]:
        """Read replies on this thread until ``future`` is done, if the
        transport lets this thread read (else whoever reads settles it).
        Returns what is left of ``timeout``."""
        if self.conn.decoding.busy() and not on_broker_thread():
            # Its reply may be on the decode thread, which settles it; a
            # reader here would only notice at its next slice (half a second).
            return timeout
        reading = self.take()
        if reading is TakeResult.REFUSED:
            if on_broker_thread() and not future.done():
                raise waiting_for_itself(self.conn.host, getattr(future, 'what', 'a call'))
            return timeout
        return self.read_until_done(future, timeout, reading is TakeResult.TAKEN)

    def feed_read(self, buf: Any, n: int) -> None:
        """Hand the connection ``n`` bytes this thread read from it itself
        (Connection.call's first read), as read_until_done would: a large
        frame among them is decoded here, not queued for the decode thread."""
        outer = getattr(_reading_alone, 'conn', None)
        _reading_alone.conn = self.conn
        try:
            self.conn.feed(buf, n)
        finally:
            _reading_alone.conn = outer

    def read_until_done(self, future: Settles, timeout: Optional[float],
                        give_back: bool = True) -> Optional[float]:
        """Read (this thread has the reading) until ``future`` is done or
        ``timeout`` passes, then give the reading back if ``give_back``
        (this call took it); returns what is left of ``timeout``.  Not done
        yet: the time is up, or the tunnel is closing (and is about to fail it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self.conn
        outer = getattr(_reading_alone, 'conn', None)
        _reading_alone.conn = conn
        try:
            if conn.outbox.frames:
                # What is corked goes out now, not when the broker gets to it:
                # we are about to wait for it (and may be the broker thread).
                conn.flush()
            self.direct.read_until(conn, future, timeout)
        finally:
            _reading_alone.conn = outer
            if give_back:
                self.give_back()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

"""One running agent, seen from the controller: lifecycle and frame dispatch.

A Connection owns a transport (``chopsticks.transport``), writes frames to
it from the callers' threads, and receives frames on whichever thread reads
the transport, handing replies to the handlers of pending calls
(``chopsticks.replies``), stderr and log records to its ``RemoteOutput``
(``chopsticks.output``), and import requests to the module server.  Nothing
the remote sends is unpickled or evaluated: replies go through the safe
codec, and any malformed frame closes the connection with a ProtocolError.

``CallChannel`` is what tunnels, groups, file transfer and relays call
through: a Connection, or a ``chopsticks.relay.RelayConnection`` standing
in for one on the far side of a relay.
"""
import collections
import concurrent.futures
import itertools
import logging
import pickle
import sys
import threading
import time
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Set,
                    Tuple, cast)

from . import bootstrap, codec, keepalive, wire
from .broker import on_broker_thread
from .display import printable
from .errors import ConnectError, ProtocolError, TunnelClosed, CallTimeout
from .modserver import server_for_this_process
from .outbox import CORK_MAX, Outbox
from .output import RemoteOutput
from .replies import (
    CallFuture, Handler, IterHandler, ReplyCallback, ReplyHandler,
    Reading, Settle, StreamHandler, What, name_of, reads_alone, waiting_for_itself)
from .serialize import dumps_call, describe, importable
from .transport import (
    DirectReading, ProcessTransport, ReaderState, TakeResult, Transport, TransportSink,
    reading_buffer)

if sys.version_info >= (3, 8):
    from typing import Protocol
else:  # a relay host's older Python
    Protocol = object

log = logging.getLogger('chopsticks')

MAX_FRAME = 1 << 30         # largest frame a remote may send (bytes)
IMPORTS_IN_FLIGHT = 1000    # import requests one remote may have waiting for an answer
# Frames larger than this are decoded on the connection's decode thread
# (DecodeLane) when the thread that read them serves other tunnels too: a
# hostile 640 KB reply once cost 8.5 s of decoding on the broker thread, and
# every tunnel waited.  Small replies, nearly all of them, stay on the hot path.
INLINE_DECODE_MAX = 64 << 10
DECODE_LANE_IDLE = 1.0      # seconds a decode thread waits for more work before it exits
HELLO_MAX = 4096            # bytes in an agent's HELLO (ours is ~150)
_REPLY_OPS = frozenset((wire.RESULT, wire.ERROR, wire.ITEM, wire.END, wire.CREDIT))
_RESULT = wire.RESULT
_HEADER_SIZE = wire.HEADER.size
_unpack_header = wire.HEADER.unpack_from
_pack_header = wire.HEADER.pack
_CALL = wire.CALL

_PARKED = ReaderState.PARKED
_HELD = ReaderState.HELD
_REFUSED = TakeResult.REFUSED
_TAKEN = TakeResult.TAKEN

_import_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_import_pool_lock = threading.Lock()


def import_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that serve the agents' import requests."""
    global _import_pool
    with _import_pool_lock:
        if _import_pool is None:
            _import_pool = concurrent.futures.ThreadPoolExecutor(
                4, thread_name_prefix='chopsticks-imports')
    return _import_pool


class CallChannel(Protocol):
    """What a tunnel calls through: a Connection, or a RelayConnection.

    A call travels pickled (``pickle_call``, or ``dumps_call(...,
    remote_version=None)`` once for many hosts); ``what`` names it in
    errors (a function, described only if needed, or a string).
    """
    host: str
    closed: bool
    remote: Optional[Dict[str, Any]]  # the agent's HELLO, once connected

    def pickle_call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
        """``fn(*args, **kwargs)`` pickled for this host (its module sent ahead if needed)."""

    def send_modules_for(self, fn: Callable[..., Any]) -> None:
        """Send ``fn``'s module ahead if the host most likely lacks it (or nothing)."""

    def call(self, payload: bytes, what: What, timeout: Optional[float] = None) -> Any:
        """Run a call and return its value (RemoteException, CallTimeout, TunnelClosed)."""

    def call_async(self, payload: bytes, what: What) -> 'concurrent.futures.Future[Any]':
        """Start a call; its Future."""

    def call_then(self, payload: bytes, what: What, callback: Settle) -> Any:
        """Start a call whose outcome goes to ``callback(value, exc)`` on the
        thread that reads it; returns something with ``cancel()``."""

    def call_iter(self, payload: bytes, what: What, timeout: Optional[float] = None) -> Iterator[Any]:
        """The items a remote generator yields, with flow control."""

    def call_stream(self, payload: bytes, chunks: Iterable[Any], what: What,
                    timeout: Optional[float] = None) -> Any:
        """Run ``fn(stream, ...)`` there, feeding ``chunks`` to ``stream``; its value."""

    def wait(self, future: 'concurrent.futures.Future[Any]', timeout: Optional[float],
             what: What) -> Any:
        """``future``'s result, or CallTimeout naming ``what``."""

    def wide_pipe(self, direction: str) -> wire.WidePipe:
        """A context manager widening the pipes for a bulk transfer."""

    def take_reading(self) -> TakeResult:
        """Let this thread read the replies itself (REFUSED if it cannot)."""

    def close(self) -> None: ...


# The fields of the agent's HELLO (chopsticks.agent.main): type, and longest length.
_HELLO_FIELDS: Tuple[Tuple[str, type, Optional[int]], ...] = (
    ('pid', int, None), ('python', str, 4096), ('platform', str, 64), ('hostname', str, 255),
    ('magic', bytes, 16))


def checked_hello(hello: Any) -> Dict[str, Any]:
    """The agent's HELLO with the type and size of each field checked
    (ValueError if one is wrong), before anything uses or caches it."""
    if not isinstance(hello, dict):
        raise ValueError('bad HELLO: not a dict')
    checked: Dict[str, Any] = {}
    for field, kind, longest in _HELLO_FIELDS:
        value = hello.get(field)
        if type(value) is not kind or (longest is not None and len(cast(Any, value)) > longest):
            raise ValueError('bad HELLO: %s is not a %s%s' % (
                field, kind.__name__, '' if longest is None else ' of at most %d' % longest))
        checked[field] = value
    version = hello.get('version')
    if not (isinstance(version, (tuple, list)) and 2 <= len(version) <= 5 and
            all(type(n) is int and 0 <= n < 1000 for n in version)):
        raise ValueError('bad HELLO: version is not a short sequence of small integers')
    checked['version'] = tuple(version)
    return checked


class DecodeLane(object):
    """A connection's large frames, decoded and handled on a thread of its
    own, in the order they came (see INLINE_DECODE_MAX).

    The thread starts with the first such frame and exits after
    DECODE_LANE_IDLE seconds without one.  A done-callback of a large
    reply's future runs on it: it must not wait for another large reply of
    the same tunnel (as one running on the broker thread must not wait at all).
    """

    def __init__(self, conn: 'Connection') -> None:
        self.conn = conn
        self.cond = threading.Condition(threading.Lock())
        self.queue: Deque[Tuple[int, int, Any]] = collections.deque()
        self.thread: Optional[threading.Thread] = None
        self.working = False

    def busy(self) -> bool:
        return bool(self.queue) or self.working

    def put(self, rid: int, op: int, payload: Any) -> None:
        with self.cond:
            self.queue.append((rid, op, payload))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name='chopsticks-decode-%s' % self.conn.host)
                self.thread.start()
            else:
                self.cond.notify()

    def _run(self):
        conn = self.conn
        while True:
            with self.cond:
                self.working = False
                if not self.queue and not conn.closed:
                    self.cond.wait(DECODE_LANE_IDLE)
                if not self.queue or conn.closed:
                    self.queue.clear()
                    self.thread = None
                    return
                rid, op, payload = self.queue.popleft()
                self.working = True
            try:
                conn.dispatch_now(rid, op, payload)
            except PROTOCOL_ERRORS as e:
                conn.invalid_data(e)
            except Exception:
                log.exception('chopsticks: handling a reply from %s failed', conn.host)


PROTOCOL_ERRORS = (wire.FrameError, codec.DecodeError, KeyError, TypeError, ValueError)


def _during(exc: BaseException, what: Optional[What]) -> BaseException:
    """``exc``, a lost connection, for the call of ``what``: its message
    also names the call (``[web1] connection lost (during __main__.deploy)``)."""
    if what is None or type(exc) not in (TunnelClosed, ProtocolError) or len(exc.args) != 1:
        return exc
    return type(exc)('%s (during %s)' % (exc.args[0], name_of(what)))


class Connection(object):
    """One agent on one host, from start to close; see the module docstring.

    Lifecycle: ``launch()`` starts the transport and sends the agent,
    ``wait_started()`` waits for its HELLO (``remote``), ``close()`` or a
    lost transport (``lost(exc)``) fails every pending call with ``error``.
    Reading: the broker thread reads the transport, unless a caller's thread
    takes it (``take_reading``, for transports with ``direct_reading``) to
    read its own replies.  Writing: callers' threads write under
    ``write_lock``, through the connection's ``Outbox`` (``send``,
    ``send_parts``, ``send_region``), which corks small frames.
    """

    def __init__(self, host: str, transport: Transport, settings: Optional[Dict[str, Any]] = None,
                 keepalive: Optional[float] = None) -> None:
        self.host = host
        self.keepalive = keepalive  # seconds, or None: see chopsticks.keepalive
        self.last_rx = self.last_ping = 0.0  # time.monotonic() of the last bytes in, last PING
        self.abort_error: Optional[BaseException] = None  # why it was declared dead
        self.transport = transport
        # What the transport can do, looked at once (see chopsticks.transport).
        capabilities = transport.capabilities
        self.direct: Optional[DirectReading] = \
            cast('DirectReading', transport) if capabilities.direct_reading else None
        self.file_regions = capabilities.file_regions
        self.settings = dict(settings or {})
        self.settings.setdefault('host', host)
        self.settings.setdefault('log_level', logging.getLogger().getEffectiveLevel())
        self.max_frame: int = self.settings.get('max_frame', MAX_FRAME)  # either way
        self.parser = wire.FrameParser(self.max_frame, first_max=HELLO_MAX, first_name='a HELLO')
        # Frames read, not yet dispatched (see feed).
        self.backlog: Deque[Tuple[int, int, Any]] = collections.deque()
        self.pending: Dict[int, Handler] = {}
        self.ids = itertools.count(1)
        self.futures_condition = threading.Condition()  # shared by its CallFutures
        self.modules = server_for_this_process()
        self.preloaded: Set[str] = set()  # modules of functions called so far
        self.hello = threading.Event()
        self.remote: Optional[Dict[str, Any]] = None  # the agent's HELLO
        self.closed = False
        self.error: Optional[BaseException] = None
        self.output = RemoteOutput(host)
        self.decoding = DecodeLane(self)
        self.import_slots = threading.BoundedSemaphore(IMPORTS_IN_FLIGHT)
        # Writing (chopsticks.outbox): its methods, bound once, are this connection's.
        self.outbox = outbox = Outbox(self)
        self.write_lock = outbox.lock
        self.send = outbox.send
        self.send_parts = outbox.send_parts
        self.send_region = outbox.send_region
        self.flush = outbox.flush
        self.ping_nowait = outbox.ping_nowait
        # Who reads the replies (chopsticks.replies.Reading), bound the same way.
        reading = Reading(self)
        self.take_reading = reading.take
        self.give_back_reading = reading.give_back
        self.read_for = reading.read_for
        self.read_until_done = reading.read_until_done
        self.feed_read = reading.feed_read

    # --- lifecycle
    def start(self, timeout: Optional[float]) -> None:
        self.launch()
        self.wait_started(timeout)

    def launch(self) -> None:
        """Start the remote process and send it the agent; frames may follow
        at once (see wait_started)."""
        self.transport.start(self)
        # Under write_lock, like every write: a remote that exits at once is
        # declared lost (on the broker thread), and its pipe closed, only
        # once this write is over, so it never goes to a closed or reused fd.
        with self.write_lock:
            if not self.closed:
                try:
                    self.transport.write([bootstrap.stdin_preamble(
                        self.settings, self.settings.get('compiled_agent', False))])
                except (OSError, ValueError):
                    pass  # it died already; its stderr says why, below

    def wait_started(self, timeout: Optional[float]) -> None:
        """Wait for the agent's HELLO; ConnectError if it does not come."""
        if not self.hello.wait(timeout):
            self.close()
            raise ConnectError(self.host, 'no answer from the remote python within %ss' % timeout,
                               self.stderr_text())
        if self.remote is None:  # (a malformed HELLO leaves it None: see dispatch_now)
            self.close()
            reason = self.error.args[0] if isinstance(self.error, ProtocolError) else \
                'the remote process exited before the agent started'
            raise ConnectError(self.host, reason, self.stderr_text())
        if self.keepalive:
            self.last_rx = time.monotonic()
            keepalive.watch.add(self)

    def close(self) -> None:
        self.lost(TunnelClosed('[%s] tunnel closed' % self.host))

    def abandon(self) -> None:
        """End the transport at once, taking no lock (interpreter exit)."""
        self.closed = True
        self._kill_transport()

    def lost(self, exc: BaseException) -> None:
        """The connection is over: close the transport, fail what is pending."""
        # Often on the broker thread, which must not wait for a writer stuck on
        # a host that stopped reading: end the transport, and the write fails.
        if not self.write_lock.acquire(timeout=0.05):
            if self.abort_error is None:
                self.abort_error = exc  # the reason, rather than the writer's broken pipe
            self._kill_transport()
            self.write_lock.acquire()
        try:
            if self.closed:
                return
            self.closed = True
            self.error = exc = self.abort_error or exc
        finally:
            self.write_lock.release()
        if self.keepalive:
            keepalive.watch.remove(self)
        self.transport.close()
        self.hello.set()
        pending, self.pending = self.pending, {}
        for handler in pending.values():
            handler.fail(_during(exc, getattr(handler, 'what', None)))
        self.output.end()

    def eof(self) -> None:
        tail = self.stderr_text().strip().splitlines()
        detail = (': ' + printable(tail[-1])) if tail else ''
        self.lost(TunnelClosed('[%s] connection lost%s' % (self.host, detail)))

    def stderr_text(self) -> str:
        """The tail of the agent's stderr (why it failed to start, say)."""
        return self.output.text()

    def declare_lost(self, reason: str) -> None:
        """Declare the connection dead (keepalive): off this thread, which must not block."""
        self.abort_error = exc = TunnelClosed('[%s] connection lost: %s' % (self.host, reason))
        threading.Thread(target=self._abort, args=(exc,), name='chopsticks-abort', daemon=True).start()

    def _abort(self, exc):
        # Killing the transport first unblocks any thread stuck writing to it.
        self._kill_transport()
        self.lost(exc)

    def _kill_transport(self):
        try:
            self.transport.kill()
        except Exception:
            log.debug('chopsticks: killing the transport of %s failed', self.host, exc_info=True)

    def closed_error(self) -> TunnelClosed:
        """The error for a call on a closed connection (a fresh one each time)."""
        exc = self.error
        if isinstance(exc, TunnelClosed):
            return type(exc)(*exc.args)
        return TunnelClosed('[%s] tunnel is closed' % self.host)

    # --- incoming (on the thread that reads the transport)
    def feed(self, data: Any, n: Optional[int] = None) -> None:
        """Dispatch the frames in ``data``, or in its first ``n`` bytes (see FrameParser.feed)."""
        if self.keepalive:  # only it looks: the clock costs a reply in a fan-out half a microsecond
            self.last_rx = time.monotonic()
        # Frames go through one queue: a future's done-callback may make a
        # call on this tunnel and read its reply on this same thread, inside
        # this loop; it dispatches what it reads after what is queued here,
        # so the frames of a generator, say, keep their order.
        backlog = self.backlog
        parser = self.parser
        if n is not None and n > _HEADER_SIZE and not backlog and not parser.buf and \
                parser.have is None:
            # The commonest read by far: one whole small reply, to a call
            # still pending.  Straight to its handler: the general way below
            # goes through four more functions, which cost a round trip a
            # few µs on a small machine (the controller is half its CPU).
            length, rid, op = _unpack_header(data, 0)
            if op == _RESULT and length == n - _HEADER_SIZE and length <= INLINE_DECODE_MAX:
                handler = self.pending.get(rid)
                if handler is not None:
                    try:
                        if handler.frame(op, bytes(data[_HEADER_SIZE:n])):
                            self.pending.pop(rid, None)
                    except PROTOCOL_ERRORS as e:
                        self.invalid_data(e)
                    return
        try:
            backlog.extend(parser.feed(data, n))
            while backlog:
                rid, op, payload = backlog.popleft()
                self.dispatch(rid, op, payload)
        except PROTOCOL_ERRORS as e:
            backlog.clear()
            self.invalid_data(e)

    def invalid_data(self, exc: BaseException) -> TunnelClosed:
        """The remote sent something that is not protocol (``exc`` says
        what): close the tunnel, failing its pending calls; the error."""
        self.lost(ProtocolError('[%s] the remote sent invalid data (%s: %s); '
                                'the tunnel was closed' % (self.host, type(exc).__name__, exc)))
        error = self.error
        return error if isinstance(error, ProtocolError) else self.closed_error()

    def dispatch(self, rid: int, op: int, payload: Any) -> None:
        """Handle a frame now, or, if it is large and this thread reads other
        tunnels too (the broker, a group's reader), on the decode thread."""
        if len(payload) > INLINE_DECODE_MAX and not reads_alone(self):
            handler = self.pending.get(rid)
            # A generator's items are decoded by their consumer: in order, and never here.
            if handler is None or op not in _REPLY_OPS or handler.decodes_in_frame:
                self.decoding.put(rid, op, payload)
                return
        self.dispatch_now(rid, op, payload)

    def dispatch_now(self, rid: int, op: int, payload: Any) -> None:
        handler = self.pending.get(rid)
        if handler is not None and op in _REPLY_OPS:
            if handler.frame(op, payload):
                self.pending.pop(rid, None)
        elif op == wire.IMPORT:
            query = codec.decode(payload)
            # Each waiting request costs memory here; an agent asks from threads
            # that wait for the answer, so only a hostile one piles up more.
            if not self.import_slots.acquire(blocking=False):
                raise ValueError('more than %d import requests waiting' % IMPORTS_IN_FLIGHT)
            import_pool().submit(self._serve_import, rid, query)
        elif op == wire.LOG:
            self.output.log(codec.decode(payload))
        elif op == wire.HELLO:
            if self.remote is not None:
                raise ValueError('a second HELLO')
            if len(payload) > HELLO_MAX:  # refused before decoding (a 256 MB one took 2.3 GB)
                raise ValueError('a HELLO of %d bytes' % len(payload))
            hello = checked_hello(codec.decode(payload))  # remote stays None if it is bad
            self.modules.remote_magic = hello['magic']
            self.remote = hello
            self.hello.set()
        elif op in (wire.RESULT, wire.ERROR, wire.ITEM, wire.END, wire.CREDIT, wire.PONG):
            pass  # a reply to a request that timed out or was abandoned
        else:
            raise ValueError('unexpected op %d' % op)

    def feed_stderr(self, data: Any) -> None:
        if self.keepalive:
            self.last_rx = time.monotonic()
        self.output.stderr(data)

    def _serve_import(self, rid, query):
        try:
            reply = self.modules.handle(query)
            # Never a blocking write here: these threads serve every tunnel.
            self.outbox.send_nowait(rid, wire.MODULE, reply)
        except TunnelClosed:
            pass
        finally:
            self.import_slots.release()

    # --- calls (callers' threads; see CallChannel)
    def pickle_call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
        try:
            remote = self.remote
            payload: bytes = dumps_call(fn, args, kwargs, remote and remote['version'])
        except (TypeError, ValueError, AttributeError, RecursionError, pickle.PicklingError) as e:
            # Same type, so callers catching it still do; the message says where and what.
            try:
                error = type(e)('[%s] cannot send the call to %s: %s' % (self.host, describe(fn), e))
            except Exception:
                raise e
            raise error from e
        if getattr(fn, '__module__', None) not in self.preloaded:  # (send_modules_for's first test)
            self.send_modules_for(fn)
        return payload

    def send_modules_for(self, fn: Callable[..., Any]) -> None:
        """Before the first call into the module ``fn`` comes from, send that
        module ahead if the host most likely lacks it (ModuleServer.preload):
        the agent would otherwise ask for it, a round trip (50 ms on a WAN).
        Only for a function called by reference: one that travels as source
        (a lambda, a closure) does not import its module there."""
        module = getattr(fn, '__module__', None)
        if not isinstance(module, str) or module in self.preloaded or not importable(fn):
            return
        if self.remote is None and getattr(self.modules, 'remote_magic', None) is None:
            # A call sent before the HELLO (see BaseTunnel.call): the agent
            # asks, rather than compile what it could get compiled.
            return
        self.preloaded.add(module)
        preload = getattr(self.modules, 'preload', None)  # a relay's server forwards: none
        try:
            payload = preload(module) if preload is not None else None
        except Exception:
            # Only a shortcut: the agent asks for the module instead, and an
            # error serving it then reaches the caller with the import.
            log.debug('chopsticks: cannot send %s ahead to %s', module, self.host, exc_info=True)
            return
        if payload is not None:
            self.send(0, wire.MODULES, payload)

    def request(self, op: int, handler: Handler, payload: bytes) -> int:
        """Send a pickled call (``pickle_call``) and register its handler;
        returns the request id."""
        if len(payload) > self.max_frame:  # the agent would refuse the frame
            raise ValueError('[%s] the call is %d bytes pickled, more than the %d a frame may carry: '
                             'send big data with put() or call_stream()'
                             % (self.host, len(payload), self.max_frame))
        rid = next(self.ids)
        self.pending[rid] = handler
        direct = self.direct
        if direct is not None and (direct.state is _PARKED or direct.state is _HELD):
            direct.unpark()  # the broker reads this reply (after pending: see call)
        try:
            self.send(rid, op, payload)
        except TunnelClosed:
            self.pending.pop(rid, None)
            raise
        return rid

    def call(self, payload: bytes, what: What, timeout: Optional[float] = None) -> Any:
        """Send a pickled call (``pickle_call``) and wait for its value.

        The pipe is taken before the call goes out, so the broker thread
        never wakes for the reply: this thread reads it.  A call made while
        no other is pending, a script's loop of calls and the commonest use
        by far, takes a short way: its reply most likely comes alone, in one
        read, which read_reply hands over as it is, and the pipe is kept for
        this thread's next call (hold_stdout) rather than handed back to the
        broker.  The handler, reader and parser of the general way
        (_call_shared) join in only if anything else comes.  In a loop of
        calls each Python function on this path costs about half a
        microsecond, caches being cold after every switch between the
        processes; from 69 functions a round trip to 35-40 took the
        controller's CPU per call from 37-40 to 27-30 µs over ssh and from
        49 to 41 µs over a Local tunnel (bench/RESULTS.md, "The round trip
        as a user meets it").
        """
        direct = self.direct
        reading = _REFUSED if direct is None else direct.take_stdout()
        size = len(payload)
        if reading is not _TAKEN or self.pending or size > CORK_MAX:
            return self._call_shared(reading, payload, what, timeout)
        assert direct is not None  # (TAKEN)
        rid = next(self.ids)
        try:  # (request and Outbox.send, inlined: nothing to unpark, this thread reads)
            self.outbox.send_frame([_pack_header(size, rid, _CALL) + payload], size)
        except BaseException:
            self.give_back_reading()
            raise
        deadline = None if timeout is None else time.monotonic() + timeout
        parser = self.parser
        got = direct.read_reply(self, rid, timeout,
                                not self.backlog and not parser.buf and parser.have is None)
        if isinstance(got, bytes):
            # Kept for this thread's next call; given to the broker at once if
            # another thread's call is pending (it checks HELD after adding
            # itself to pending, as this does the reverse: one sees the other).
            direct.hold_stdout()
            if self.pending:
                direct.unpark()
            if self.keepalive:  # (as feed does)
                self.last_rx = time.monotonic()
            try:
                return codec.decode(got)
            except PROTOCOL_ERRORS as e:
                raise self.invalid_data(e)
        # Anything else: the general way, with a handler for the reply first.
        reply = ReplyHandler(self, what)
        self.pending[rid] = reply
        if self.closed:  # lost while we read, maybe before the handler was there to fail
            self.pending.pop(rid, None)
            self.give_back_reading()
            raise _during(self.closed_error(), what)
        if got:
            self.feed_read(reading_buffer(), got)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if reply.outcome is None:
            left = self.read_until_done(reply, left)
        else:
            self.give_back_reading()
        return self._outcome(reply, rid, what, timeout, left)

    def _call_shared(self, reading: TakeResult, payload: bytes, what: What,
                     timeout: Optional[float]) -> Any:
        """``call`` while other calls are pending, or when another thread reads."""
        if reading is _REFUSED and on_broker_thread():
            raise waiting_for_itself(self.host, what)
        reply = ReplyHandler(self, what)
        try:
            rid = self.request(wire.CALL, reply, payload)
        except BaseException:
            if reading is _TAKEN:
                self.give_back_reading()
            raise
        left = timeout if reading is _REFUSED else \
            self.read_until_done(reply, timeout, reading is _TAKEN)
        return self._outcome(reply, rid, what, timeout, left)

    def _outcome(self, reply: ReplyHandler, rid: int, what: What, timeout: Optional[float],
                 left: Optional[float]) -> Any:
        """The value of the call ``rid``, once its reply is read (or ``left``
        seconds more, if another thread reads it)."""
        if reply.outcome is None and not reply.wait(left):  # (read here, mostly: settled)
            self.pending.pop(rid, None)
            raise CallTimeout('[%s] %s did not finish within %ss' % (self.host, name_of(what), timeout))
        value, error = reply.outcome  # type: ignore[misc]  # settled: wait() said so
        if error is not None:
            raise error
        return value

    def call_async(self, payload: bytes, what: What) -> CallFuture:
        """Start a call (pickled once by ``dumps_call(..., remote_version=None)``
        for many connections, or by ``pickle_call``); its future."""
        future = CallFuture(self, what)
        self.request(wire.CALL, future, payload)
        return future

    def call_then(self, payload: bytes, what: What, callback: Settle) -> ReplyCallback:
        """Like ``call_async``, but the outcome goes to ``callback(value, exc)``,
        on the thread that reads the reply; returns a ReplyCallback
        (``done()``, ``cancel()``)."""
        reply = ReplyCallback(self, what, callback)
        reply.rid = self.request(wire.CALL, reply, payload)
        return reply

    def call_iter(self, payload: bytes, what: What, timeout: Optional[float] = None) -> Iterator[Any]:
        """Iterate over the items of a remote generator call."""
        if on_broker_thread():  # the items would come through this very thread
            raise waiting_for_itself(self.host, what)
        handler = IterHandler(self, what)
        rid = self.request(wire.CALL_ITER, handler, payload)
        yield from handler.each(rid, timeout)

    def call_stream(self, payload: bytes, chunks: Iterable[Any], what: What,
                    timeout: Optional[float] = None) -> Any:
        """Call ``fn(stream, *args, **kwargs)`` remotely, feeding ``chunks`` to ``stream``."""
        if on_broker_thread():  # the host's credits would come through this very thread
            raise waiting_for_itself(self.host, what)
        handler = StreamHandler(self, what)
        return handler.pour(self.request(wire.CALL_STREAM, handler, payload), chunks, timeout)

    def wait(self, future: 'concurrent.futures.Future[Any]', timeout: Optional[float],
             what: What) -> Any:
        """The result of ``future`` (a CallFuture reads its own reply), or
        CallTimeout naming ``what``."""
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise CallTimeout('[%s] %s did not finish within %ss' % (self.host, name_of(what), timeout))

    def wide_pipe(self, direction: str) -> wire.WidePipe:
        """A context manager for a bulk transfer: ``'send'`` or ``'receive'``
        (see wire.WidePipe).  Transports without pipes change nothing."""
        return self.transport.wide_pipe(direction)


if TYPE_CHECKING:  # the checker proves that each implementation has its interface
    from .relay import RelayConnection
    from .ssh import ParamikoTransport

    def _interfaces(conn: Connection, relayed: RelayConnection, process: ProcessTransport,
                    paramiko: ParamikoTransport) -> None:
        channels: List[CallChannel] = [conn, relayed]
        transports: List[Transport] = [process, paramiko]
        direct: DirectReading = process
        sink: TransportSink = conn

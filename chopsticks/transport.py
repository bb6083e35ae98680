"""What carries an agent's frames: the transport interface, and the process transport.

A transport starts the agent (a child process, or a paramiko channel),
writes the controller's frames to it and hands what the agent sends to its
connection (a ``TransportSink``): stdout's bytes to ``feed``, stderr's to
``feed_stderr``, and the end of stdout to ``eof``.  That is all every
transport must do (``Transport``).  Two things only some can do, said by
``capabilities`` and looked at once, when a Connection is made:

- ``direct_reading``: a caller's thread may take stdout from the broker and
  read its own replies (``DirectReading``): a third of a round trip saved
  on a small machine.  Who reads is one ``ReaderState``.
- ``file_regions``: the last part given to ``write`` may be a ``FileRegion``,
  sent from the file with sendfile, never copied through this process.

``ProcessTransport`` (local python, ssh, sudo, docker) can do both; the
paramiko transport (``chopsticks.ssh``) neither.  This module is imported on
relay hosts too, so it runs on Python 3.6: ``typing.Protocol`` only where
the interpreter has it (the checker always does).
"""
import enum
import errno
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from . import wire
from .broker import get_broker
from .errors import ConnectError

if sys.version_info >= (3, 8):
    from typing import Protocol
else:  # a relay host's older Python: the interfaces are documentation there
    Protocol = object

if TYPE_CHECKING:
    from .replies import Settles

DIRECT_READ_BUFFER = 256 << 10  # per caller thread that reads its own replies
DIRECT_READ_SLICE = 0.5     # seconds such a caller waits before looking for a close()
_SLICE_MS = DIRECT_READ_SLICE * 1000.0
_HEADER_SIZE = wire.HEADER.size
_unpack_header = wire.HEADER.unpack_from
_RESULT = wire.RESULT

Buffer = Union[bytes, bytearray, memoryview]


class TransportSink(Protocol):
    """What a transport hands the agent's output to (a Connection)."""
    host: str

    def feed(self, data: Buffer, n: Optional[int] = None) -> None:
        """Bytes from the agent's stdout (frames), or the first ``n`` of ``data``."""

    def feed_stderr(self, data: Buffer) -> None:
        """Bytes from the agent's stderr (its output, and why it failed to start)."""

    def eof(self) -> None:
        """stdout ended: the agent is gone (stderr was read to its end first)."""


class Capabilities(object):
    """What a transport can do beyond ``Transport``; read once per connection."""
    __slots__ = ('direct_reading', 'file_regions')

    def __init__(self, direct_reading: bool = False, file_regions: bool = False) -> None:
        self.direct_reading = direct_reading  # it is a DirectReading too
        self.file_regions = file_regions      # write() takes a FileRegion as its last part

    def __repr__(self) -> str:
        return 'Capabilities(direct_reading=%r, file_regions=%r)' % (
            self.direct_reading, self.file_regions)


NO_CAPABILITIES = Capabilities()


class Transport(Protocol):
    """What every transport does.  Writes come from callers' threads, one at
    a time (the connection's write lock); reads happen on the broker thread
    unless the transport can be read directly."""
    capabilities: Capabilities

    def start(self, sink: TransportSink) -> None:
        """Start the agent's process or channel and begin handing its output
        to ``sink``; ConnectError naming the host if it cannot start."""

    def write(self, parts: Sequence[Any]) -> None:
        """Write every buffer, waiting as long as it takes (OSError or
        ValueError once the other end is gone)."""

    def write_nowait(self, parts: Sequence[Buffer]) -> List[memoryview]:
        """Write what the other end takes now; return what is left unwritten."""

    def wide_pipe(self, direction: str) -> wire.WidePipe:
        """A context manager for a bulk transfer, ``'send'`` or ``'receive'``."""

    def kill(self) -> None:
        """End the agent now, taking no lock: a blocked write then fails."""

    def close(self) -> None:
        """Close the pipes and let the agent exit (it exits when stdin closes)."""


class ReaderState(enum.Enum):
    """Who reads a transport's stdout (see ProcessTransport)."""
    BROKER = 'the broker thread reads it'
    CALLER = 'a caller thread took it and reads its own replies'
    PARKED = 'given back to the broker, which reads it unless a caller takes it soon'
    HELD = ('kept by the caller that read its own reply, for its next call: the broker '
            'takes it back when that caller stops calling, or another thread awaits a reply')
    CLOSED = 'the transport closed; whoever still reads it closes the pipe'


_CLOSED = ReaderState.CLOSED
_HELD = ReaderState.HELD


class TakeResult(enum.Enum):
    """What ``DirectReading.take_stdout`` did."""
    TAKEN = 'this thread reads stdout now, and gives it back when done'
    REFUSED = 'another thread reads it, or it closed, or it cannot be read directly'
    NESTED = 'this thread reads it already (a callback of its reads made a call): do not give it back'


class DirectReading(Protocol):
    """A transport a caller's thread may read itself (``capabilities.direct_reading``)."""
    state: ReaderState
    reader: Optional[int]
    stdout: Any  # has fileno()

    def take_stdout(self) -> TakeResult: ...
    def give_back_stdout(self) -> None: ...
    def hold_stdout(self) -> None: ...
    def unpark(self) -> None: ...
    def read_until(self, sink: TransportSink, future: 'Settles', timeout: Optional[float]) -> None: ...
    def read_reply(self, sink: TransportSink, rid: int, timeout: Optional[float],
                   lone_ok: bool) -> Union[bytes, int]: ...
    def read_once(self, sink: TransportSink, buf: Any) -> bool: ...


class FileRegion(object):
    """``length`` bytes of the open file ``fd`` from ``offset``, as a chunk
    for ``call_stream``: a transport with a pipe sends it with sendfile, so
    this process never copies the bytes (``chopsticks.files.put``).  Valid
    while the file stays open; if it ends early, zeros make up the frame
    and the digest that follows no longer matches."""
    __slots__ = ('fd', 'offset', 'length')

    def __init__(self, fd, offset, length):
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self):
        return self.length

    def read(self):
        """The bytes, for a transport that cannot send from a file."""
        data = os.pread(self.fd, self.length, self.offset)
        return data + bytes(self.length - len(data))


# sendfile(2) into a pipe is Linux's (2.6.33+); elsewhere the region is read and written.
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP}


# --- transports ----------------------------------------------------------------------

# A transport's process leads a process group of its own: Ctrl-C at the
# terminal (sent to the foreground group) reaches the controller alone, which
# then closes its tunnels, and _kill can end ssh with its ProxyCommand.  Not a
# session of its own, where Python allows: Linux's autogroup scheduling (on by
# default in Debian, Ubuntu and Fedora kernels) makes each session a
# scheduling group, and 48 ssh processes in 48 groups cost a one-call-to-48-
# hosts round 9-11% more (ssh 4 µs and sshd 8 µs more per call, alternated
# blocks on loopback: bench/RESULTS.md).
if sys.version_info >= (3, 11):
    _OWN_PROCESS_GROUP: Dict[str, Any] = {'process_group': 0}
else:
    # (preexec_fn is not safe with threads)
    _OWN_PROCESS_GROUP: Dict[str, Any] = {'start_new_session': True}

class ProcessTransport(object):
    """The agent runs in (or behind) a child process: local python, ssh, sudo, docker."""

    capabilities = Capabilities(direct_reading=True, file_regions=True)

    def __init__(self, argv, env=None, what=None):
        self.argv = argv
        self.env = env
        self.what = what or argv[0]
        self.proc: Any = None  # the subprocess.Popen, once started
        # Whoever reads stdout holds read_lock: the broker while it pumps, or
        # a caller waiting for its own reply (see take_stdout); ``reader`` is
        # that thread's ident.  state_lock guards the handover and ``state``.
        # A pipe is closed only by its reader, or while nobody reads it: a
        # thread between ``pipe.fileno()`` and ``os.readv`` would otherwise
        # read the fd number after it was closed and given to the pipe of a
        # new connection (and eat that agent's HELLO).  stderr_lock is held
        # while stderr is read, for the same reason.
        self.read_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.stderr_lock = threading.RLock()
        self.state = ReaderState.BROKER
        self.reader: Optional[int] = None
        self.holder: Optional[int] = None  # the thread that keeps stdout HELD
        self.held_calls = 0  # calls that took stdout from HELD (release_if_idle)
        self.held_calls_seen = 0
        self.held_watched = False  # in the broker's watch_held set
        self.stdout_poller = None
        self.broker = get_broker()  # looked up once: the call would cost every reply

    def start(self, conn):
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                bufsize=0, close_fds=True, env=self.env, **_OWN_PROCESS_GROUP)
        except OSError as e:
            raise ConnectError(conn.host, 'cannot run %s: %s' % (self.what, e))
        self.stdin = self.proc.stdin.fileno()
        self.stdout = self.proc.stdout
        self.stderr = self.proc.stderr
        os.set_blocking(self.stdin, False)
        os.set_blocking(self.stdout.fileno(), False)
        os.set_blocking(self.stderr.fileno(), False)
        broker = self.broker
        self._on_stdout = lambda: self._pump_stdout(conn)
        # stderr first: stdout's EOF (ssh that failed at once) closes both pipes.
        broker.register(self.stderr, lambda: self._pump_stderr(conn))
        broker.register(self.stdout, self._on_stdout)

    def _pump_stdout(self, conn):
        if not self.read_lock.acquire(blocking=False):
            return  # a caller reads it now, and is taking it off the broker
        self.reader = threading.get_ident()
        try:
            self._pump(self.stdout, conn.feed, lambda: self._eof(conn))
        finally:
            with self.state_lock:
                self.reader = None
                self._let_go_of_stdout()

    def _pump_stderr(self, conn):
        with self.stderr_lock:
            self._pump(self.stderr, conn.feed_stderr, None)

    def _let_go_of_stdout(self):
        """(Under state_lock, by read_lock's holder.)  Release read_lock,
        closing stdout first if the transport closed meanwhile (see close)."""
        if self.state is ReaderState.CLOSED:
            _close_quietly(self.stdout)
        self.read_lock.release()

    # A caller waiting for its own reply reads stdout itself: handing each
    # reply over from the broker thread costs two thread wake-ups, a third of
    # a round trip on a small machine.  It dispatches every frame it reads
    # (other callers' replies too) and gives the pipe back to the broker
    # when its reply is in.  See Connection.call.
    def take_stdout(self):
        """Take stdout from the broker for this thread (see TakeResult)."""
        me = threading.get_ident()
        if self.reader == me:
            return TakeResult.NESTED
        if self.state is _HELD and self.holder == me:
            with self.state_lock:
                if self.state is _HELD:  # (not taken back by the broker meanwhile)
                    self.state = ReaderState.CALLER
                    self.reader = me
                    self.held_calls += 1
                    return TakeResult.TAKEN
        if not self.read_lock.acquire(blocking=False):
            return TakeResult.REFUSED
        with self.state_lock:
            if self.state is ReaderState.CLOSED:
                self._let_go_of_stdout()
                return TakeResult.REFUSED
            self.state = ReaderState.CALLER
            self.reader = me
        self.broker.unregister(self.stdout)
        return TakeResult.TAKEN

    def reads_directly(self):
        """Whether this thread took stdout (take_stdout) and reads its own replies."""
        return self.state is ReaderState.CALLER and self.reader == threading.get_ident()

    def read_until(self, conn, future, timeout):
        """Read and dispatch frames until ``future`` is done or ``timeout`` passes."""
        fd = self.stdout.fileno()
        buf = reading_buffer()
        poller = self.stdout_poller
        if poller is None:
            poller = self.stdout_poller = select.poll()  # only read_lock's holder uses it
            poller.register(fd, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        readv = os.readv
        while not future.done() and self.state is not _CLOSED:
            # In slices, so a close() from another thread is seen soon.
            wait = DIRECT_READ_SLICE if deadline is None else \
                min(DIRECT_READ_SLICE, deadline - time.monotonic())
            if wait < 0:
                return
            if poller.poll(wait * 1000.0):
                # read_once, inlined: this loop is half of a small call's time here.
                try:
                    n = readv(fd, [buf])
                except BlockingIOError:
                    continue
                except (OSError, ValueError):
                    n = 0
                if not n:
                    self._stdout_ended(conn)
                    return
                conn.feed(buf, n)

    def read_reply(self, conn, rid, timeout, lone_ok):
        """Wait up to ``timeout`` seconds (None: DIRECT_READ_SLICE) for stdout
        and read it once, into this thread's reading_buffer(): the payload of
        call ``rid``'s reply, as bytes, if the read is that reply alone and
        ``lone_ok`` (the sink holds no partial frame); else how many
        bytes were read, for the caller to feed (0: none; at EOF the sink's
        eof() was called).  The first wait of a call made while no other is
        pending (Connection.call), before read_until's general loop."""
        poller = self.stdout_poller
        if poller is None:
            poller = self.stdout_poller = select.poll()  # only read_lock's holder uses it
            poller.register(self.stdout.fileno(), select.POLLIN)
        if self.state is _CLOSED or not poller.poll(
                _SLICE_MS if timeout is None else min(_SLICE_MS, max(timeout, 0.0) * 1000.0)):
            return 0
        try:
            buf = _thread_state.buffer
        except AttributeError:
            buf = reading_buffer()
        try:
            n = os.readv(self.stdout.fileno(), [buf])
        except BlockingIOError:
            return 0
        except (OSError, ValueError):
            n = 0
        if not n:
            self._stdout_ended(conn)
            return 0
        if lone_ok and n > _HEADER_SIZE:
            length, got, op = _unpack_header(buf, 0)
            if got == rid and op == _RESULT and length == n - _HEADER_SIZE:
                return bytes(buf[_HEADER_SIZE:n])
        return n

    def read_once(self, conn, buf):
        """Read what stdout holds into ``buf`` and dispatch it; False at EOF.
        Only for the thread that took stdout (take_stdout)."""
        try:
            n = os.readv(self.stdout.fileno(), [buf])
        except BlockingIOError:
            return True
        except (OSError, ValueError):
            n = 0
        if not n:
            self._stdout_ended(conn)
            return False
        conn.feed(buf, n)
        return True

    def _stdout_ended(self, conn):
        """EOF on stdout, read by a caller's thread: the connection ends."""
        self.broker.unregister(self.stderr)  # _eof drains it here, not the broker too
        self._eof(conn)

    def give_back_stdout(self):
        """Give stdout back to the broker, parked: it reads it only if no
        caller takes it within PARK_TIME (unpark() when a reply is awaited)."""
        with self.state_lock:
            self.reader = None
            if self.state is _CLOSED:
                self._let_go_of_stdout()
            else:
                self.read_lock.release()  # (_let_go_of_stdout, inlined: not closed)
                self.state = ReaderState.PARKED
                self.broker.park(self.stdout, self._on_stdout)

    def hold_stdout(self):
        """Keep stdout for this thread's next call (ReaderState.HELD), rather
        than give it back (give_back_stdout): a thread making calls one after
        another then takes it back without a lock handed over or a word to
        the broker.  The broker takes it back once no call came for
        PARK_TIME (release_if_idle), and unpark() as soon as another thread
        awaits a reply."""
        with self.state_lock:
            self.reader = None
            if self.state is _CLOSED:
                self._let_go_of_stdout()
                return
            self.state = _HELD
            self.holder = threading.get_ident()
            if self.held_watched:
                return
            self.held_watched = True
            self.held_calls_seen = -1  # the broker's first look only counts
        self.broker.watch_held(self)

    def release_if_idle(self):
        """(The broker's timer, every PARK_TIME.)  Give the broker stdout if
        it is held and no call took it since the last look."""
        with self.state_lock:
            if self.state is _HELD and self.held_calls == self.held_calls_seen:
                self._release_held()
            elif self.state is _HELD or self.state is ReaderState.CALLER:
                self.held_calls_seen = self.held_calls
                return
            self.held_watched = False
            self.broker.unwatch_held(self)

    def _release_held(self):
        # (Under state_lock, HELD.)  The holder's read_lock, released for it.
        self.holder = None
        self.state = ReaderState.BROKER
        self.read_lock.release()
        self.broker.register(self.stdout, self._on_stdout)

    def unpark(self):
        """The broker reads stdout from now on: a reply is awaited."""
        with self.state_lock:
            if self.state is ReaderState.PARKED:
                self.state = ReaderState.BROKER
                self.broker.register(self.stdout, self._on_stdout)
            elif self.state is _HELD:
                self._release_held()

    def _eof(self, conn):
        # The process's last stderr lines say why it ended ("Connection refused"):
        # read them now, before the connection closes the pipe.  (stdout's EOF
        # and stderr's data often arrive in one select(), stdout's first.)
        with self.stderr_lock:
            while True:
                try:
                    data = os.read(self.stderr.fileno(), 1 << 16)
                except (OSError, ValueError):
                    break
                if not data:
                    break
                conn.feed_stderr(data)
        conn.eof()

    def _pump(self, pipe, sink, on_eof):
        # Into the broker's one buffer: os.read(fd, 1 MiB) would allocate (and
        # fault in) a fresh megabyte for every 20-byte reply.  Sinks copy what
        # they keep, so the buffer is free again once they return.
        buf = self.broker.read_buffer
        try:
            n = os.readv(pipe.fileno(), [buf])
        except BlockingIOError:
            return
        except (OSError, ValueError):  # ValueError: closed meanwhile, by the stdout side
            n = 0
        if n:
            sink(memoryview(buf)[:n])
            return
        self.broker.unregister(pipe)
        if on_eof is not None:
            on_eof()

    def write(self, parts):
        """Write every buffer, waiting for the pipe as long as it takes.  The
        last part may be a FileRegion (see write_file)."""
        region = parts[-1] if type(parts[-1]) is FileRegion else None
        views = self.write_nowait(parts if region is None else parts[:-1])
        while views:
            self._wait_writable()  # or the reader is gone (writev then fails)
            views = self._write_views(views)
        if region is not None:
            missing = region.length - self.write_file(region)
            if missing:  # the file shrank: the frame stays whole, the digest will not match
                self.write([bytes(missing)])

    def write_file(self, region):
        """Write a FileRegion with sendfile, waiting for the pipe as long as
        it takes; returns how many bytes the file had (fewer: it ended)."""
        done = 0
        while done < region.length:
            try:
                n = os.sendfile(self.stdin, region.fd, region.offset + done, region.length - done)
            except BlockingIOError:
                self._wait_writable()  # or the reader is gone (sendfile then fails)
                continue
            except OSError as e:
                if done or e.errno not in _NO_SENDFILE:
                    raise
                data = region.read()
                self.write([data])
                return len(data)
            if not n:
                break  # the end of the file
            done += n
        return done

    def _wait_writable(self):
        """Wait until stdin takes bytes again."""
        poller = select.poll()
        poller.register(self.stdin, select.POLLOUT)
        poller.poll()

    def write_nowait(self, parts):
        """Write what the pipe takes now; return the views left unwritten."""
        if len(parts) == 1:  # one small frame, as most calls are
            try:
                written = os.write(self.stdin, parts[0])
            except BlockingIOError:
                written = 0
            return wire.byte_views([memoryview(parts[0])[written:]]) if written < len(parts[0]) else []
        return self._write_views(wire.byte_views(parts))

    def _write_views(self, views):
        # stdin is non-blocking (see start): a caller that reads its own
        # replies must never block writing, or the host, blocked writing to
        # us in turn, would never read again.
        fd = self.stdin
        while views:
            try:
                wire.drop_written(views, os.writev(fd, views[:512]))
            except BlockingIOError:
                break
        return views

    def wide_pipe(self, direction):
        """Widen stdin (``'send'``) or stdout (``'receive'``) for a bulk transfer."""
        try:
            fd = (self.proc.stdin if direction == 'send' else self.stdout).fileno()
        except ValueError:
            fd = None  # closed: the transfer fails anyway
        return wire.WidePipe(fd)

    def kill(self):
        """End the process now (the connection is dead); a blocked write fails."""
        if self.proc is not None:
            _kill(self.proc)

    def close(self):
        proc = self.proc
        if proc is None:
            return
        with self.state_lock:
            held = self.state is _HELD
            self.state = ReaderState.CLOSED  # first: from now on nobody parks or registers stdout
        broker = self.broker
        for pipe in (proc.stdout, proc.stderr):
            broker.unregister(pipe)
        with self.state_lock:
            if self.reader == threading.get_ident():
                _close_quietly(proc.stdout)  # this thread reads it, and is not inside a read
            elif held or self.read_lock.acquire(blocking=False):
                self._let_go_of_stdout()  # nobody reads it (HELD: for its holder): closed now
            # else its reader, in poll() or a read now, closes it as it lets go
        with self.stderr_lock:
            _close_quietly(proc.stderr)
        # stdin: writes happen under the connection's write_lock, and none
        # starts once it is closed (Connection.lost).
        _close_quietly(proc.stdin)
        # The agent exits when its stdin closes; make sure, without waiting long.
        # (Not at interpreter exit: a thread started then never runs, and
        # Thread.start() would wait for it forever.)
        if proc.poll() is None and not sys.is_finalizing():
            threading.Thread(target=_reap, args=(proc,), daemon=True).start()

    def pid(self):
        return self.proc.pid if self.proc else None



_thread_state = threading.local()


def reading_buffer():
    """This thread's buffer for reading replies (see ProcessTransport.read_until)."""
    buf = getattr(_thread_state, 'buffer', None)
    if buf is None:
        buf = _thread_state.buffer = wire.aligned_buffer(DIRECT_READ_BUFFER)
    return buf


def _close_quietly(pipe):
    try:
        pipe.close()
    except OSError:
        pass


def _reap(proc):
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.wait()


def _kill(proc):
    """SIGKILL a transport's process and what it started (ssh's ProxyCommand):
    it leads its own process group (_OWN_PROCESS_GROUP)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        try:
            proc.kill()
        except OSError:
            pass



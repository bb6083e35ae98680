"""One running agent, seen from the controller.

A Connection owns a transport (a child process's pipes, or a paramiko
channel), writes frames to it from the callers' threads, and receives frames
on the broker thread, pairing replies with pending requests by id.  Nothing
the remote sends is unpickled or evaluated: replies go through the safe
codec, and any malformed frame closes the connection with a ProtocolError.
"""
import atexit
import collections
import concurrent.futures
import errno
import itertools
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time

from . import bootstrap, codec, wire
from .broker import get_broker, on_broker_thread
from .errors import ConnectError, ProtocolError, RemoteException, TunnelClosed, CallTimeout
from .modserver import server_for_this_process
from .serialize import dumps_call, describe, importable

log = logging.getLogger('chopsticks')

MAX_FRAME = 1 << 30         # largest frame a remote may send (bytes)
STDERR_TAIL = 64 * 1024     # stderr kept for error messages
STDERR_LINE_MAX = 16 * 1024  # a longer line is shown in pieces
ITER_CREDIT_BATCH = 32      # generator items acknowledged at a time
STREAM_WINDOW = 8 << 20     # input-stream bytes in flight before the sender waits
STREAM_CHUNK = 1 << 20      # the largest DATA frame we send
STREAM_ABORT_WAIT = 5.0     # seconds a failed input stream waits for the host to clean up
CORK_MAX = 64 * 1024        # frames up to this size may wait to be sent together
RELAY_BUFFER = 1 << 20      # remote output waiting for our stderr before lines are dropped
LOGGER_NAME_MAX = 200       # characters in a logger name a remote may use...
LOGGER_NAMES_MAX = 1000     # ...and how many names one connection may bring into being
REMOTE_LOGGER = 'chopsticks.remote'  # where records with other names go
IMPORTS_IN_FLIGHT = 1000    # import requests one remote may have waiting for an answer
DIRECT_READ_BUFFER = 256 << 10  # per caller thread that reads its own replies
DIRECT_READ_SLICE = 0.5     # seconds such a caller waits before looking for a close()
ALREADY_READING = 'already reading'  # see ProcessTransport.take_stdout

_PENDING = concurrent.futures._base.PENDING  # a Future's first state (see CallFuture)
_DONE = (concurrent.futures._base.CANCELLED, concurrent.futures._base.CANCELLED_AND_NOTIFIED,
         concurrent.futures._base.FINISHED)

_import_pool = None
_import_pool_lock = threading.Lock()


def import_pool():
    global _import_pool
    with _import_pool_lock:
        if _import_pool is None:
            _import_pool = concurrent.futures.ThreadPoolExecutor(
                4, thread_name_prefix='chopsticks-imports')
    return _import_pool


class OutputRelay(object):
    """Shows remote output (stderr lines, log records) from a thread of its own.

    The broker thread reads every tunnel: if it wrote to ``sys.stderr`` or ran
    logging handlers itself, a slow or blocked stderr (a full pipe, a paused
    terminal) would stall every tunnel.  Output waits here instead, at most
    RELAY_BUFFER bytes of it; past that, lines are dropped and a note says
    how many.
    """

    def __init__(self):
        self.cond = threading.Condition(threading.Lock())
        self.queue = collections.deque()  # (text, None) or (logger, record)
        self.queued = 0
        self.dropped = {}  # host -> lines dropped since the last note
        self.busy = False
        self.thread = None

    def has_room(self):
        return self.queued < RELAY_BUFFER

    def text(self, host, text, lines):
        self._put(host, len(text), lines, (text, None))

    def log(self, host, logger, record):
        self._put(host, len(str(record.msg)) + 256, 1, (logger, record))

    def drop(self, host, lines):
        with self.cond:
            self.dropped[host] = self.dropped.get(host, 0) + lines

    def _put(self, host, cost, lines, item):
        with self.cond:
            if self.queued and self.queued + cost > RELAY_BUFFER:
                self.dropped[host] = self.dropped.get(host, 0) + lines
                return
            self.queue.append(item)
            self.queued += cost
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name='chopsticks-output',
                                               daemon=True)
                self.thread.start()
            self.cond.notify()

    def drain(self, timeout):
        """Wait until everything queued so far was shown (at exit, say)."""
        with self.cond:
            self.cond.wait_for(lambda: not (self.queue or self.dropped or self.busy), timeout)

    def _run(self):
        while True:
            with self.cond:
                while not (self.queue or self.dropped):
                    self.busy = False
                    self.cond.notify_all()
                    self.cond.wait()
                self.busy = True
                items = list(self.queue)
                self.queue.clear()
                self.queued = 0
                dropped, self.dropped = self.dropped, {}
            texts = []
            for first, record in items:
                if record is None:
                    texts.append(first)
                    continue
                self._write(texts)
                try:
                    first.handle(record)
                except Exception:
                    pass
            texts.extend('[%s] chopsticks: %d lines of output dropped: this process\'s stderr '
                         'is not keeping up\n' % (host, n) for host, n in dropped.items())
            self._write(texts)

    @staticmethod
    def _write(texts):
        if texts:
            try:
                sys.stderr.write(''.join(texts))
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            del texts[:]


_relay = None
_relay_lock = threading.Lock()


def output_relay():
    global _relay
    with _relay_lock:
        if _relay is None:
            _relay = OutputRelay()
            atexit.register(_relay.drain, 1.0)
    return _relay


class KeepaliveWatch(object):
    """One thread for every connection with a ``keepalive``: it pings those
    that have been quiet for half their interval and declares lost those that
    stay quiet for the whole interval despite the ping (see
    ``Connection.check_alive``).  No thread at all while no tunnel asks.
    """

    def __init__(self):
        self.cond = threading.Condition(threading.Lock())
        self.conns = set()
        self.thread = None

    def add(self, conn):
        with self.cond:
            self.conns.add(conn)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name='chopsticks-keepalive',
                                               daemon=True)
                self.thread.start()
            self.cond.notify()

    def remove(self, conn):
        with self.cond:
            self.conns.discard(conn)

    def _run(self):
        while True:
            with self.cond:
                if not self.conns:
                    self.thread = None
                    return
                tick = min(conn.keepalive for conn in self.conns) / 4.0
                self.cond.wait(min(max(tick, 0.05), 1.0))
                conns = list(self.conns)
            now = time.monotonic()
            for conn in conns:
                try:
                    conn.check_alive(now)
                except Exception:
                    log.exception('chopsticks keepalive check failed')


_keepalive_watch = KeepaliveWatch()


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
    _OWN_PROCESS_GROUP = {'process_group': 0}
else:
    _OWN_PROCESS_GROUP = {'start_new_session': True}  # preexec_fn is not safe with threads

class ProcessTransport(object):
    """The agent runs in (or behind) a child process: local python, ssh, sudo, docker."""

    def __init__(self, argv, env=None, what=None):
        self.argv = argv
        self.env = env
        self.what = what or argv[0]
        self.proc = None
        # Whoever reads stdout holds read_lock: the broker, or a caller waiting
        # for its own reply (see take_stdout).  state_lock guards the handover.
        # A pipe is closed only by its reader, or while nobody reads it: a
        # thread between ``pipe.fileno()`` and ``os.readv`` would otherwise
        # read the fd number after it was closed and given to the pipe of a
        # new connection (and eat that agent's HELLO).  stderr_lock is held
        # while stderr is read, for the same reason.
        self.read_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.stderr_lock = threading.RLock()
        self.direct_reader = None  # the thread reading stdout instead of the broker
        self.parked = False  # given back to the broker for later (see give_back_stdout)
        self.pumping = None  # the broker thread, while it reads stdout
        self.stdout_poller = None
        self.closing = False
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
        self.pumping = threading.get_ident()
        try:
            self._pump(self.stdout, conn.feed, lambda: self._eof(conn))
        finally:
            with self.state_lock:
                self.pumping = None
                self._let_go_of_stdout()

    def _pump_stderr(self, conn):
        with self.stderr_lock:
            self._pump(self.stderr, conn.feed_stderr, None)

    def _let_go_of_stdout(self):
        """(Under state_lock, by read_lock's holder.)  Release read_lock,
        closing stdout first if the transport closed meanwhile (see close)."""
        if self.closing:
            _close_quietly(self.stdout)
        self.read_lock.release()

    # A caller waiting for its own reply reads stdout itself: handing each
    # reply over from the broker thread costs two thread wake-ups, a third of
    # a round trip on a small machine.  It dispatches every frame it reads
    # (other callers' replies too) and gives the pipe back to the broker
    # when its reply is in.  See Connection.call.
    def take_stdout(self):
        """Take stdout from the broker for this thread: True; False if another
        thread has it; ALREADY_READING if this thread reads it already (a
        callback run by the thread that reads it makes a call), in which
        case it must not give it back."""
        me = threading.get_ident()
        if self.direct_reader == me or self.pumping == me:
            return ALREADY_READING
        if not self.read_lock.acquire(blocking=False):
            return False
        with self.state_lock:
            if self.closing:
                self._let_go_of_stdout()
                return False
            self.direct_reader = me
            self.parked = False
        self.broker.unregister(self.stdout)
        return True

    def read_until(self, conn, future, timeout):
        """Read and dispatch frames until ``future`` is done or ``timeout`` passes."""
        fd = self.stdout.fileno()
        buf = _reading_buffer()
        poller = self.stdout_poller
        if poller is None:
            poller = self.stdout_poller = select.poll()  # only read_lock's holder uses it
            poller.register(fd, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not future.done() and not self.closing:
            # In slices, so a close() from another thread is seen soon.
            wait = DIRECT_READ_SLICE if deadline is None else \
                min(DIRECT_READ_SLICE, deadline - time.monotonic())
            if wait < 0:
                return
            if poller.poll(wait * 1000.0) and not self.read_once(conn, buf):
                return

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
            self.broker.unregister(self.stderr)  # _eof drains it here, not the broker too
            self._eof(conn)
            return False
        conn.feed(buf, n)
        return True

    def give_back_stdout(self):
        """Give stdout back to the broker, parked: it reads it only if no
        caller takes it within PARK_TIME (unpark() when a reply is awaited)."""
        with self.state_lock:
            self.direct_reader = None
            self._let_go_of_stdout()
            if not self.closing:
                self.parked = True
                self.broker.park(self.stdout, self._on_stdout)

    def unpark(self):
        """The broker reads stdout from now on: a reply is awaited."""
        with self.state_lock:
            if self.parked and not self.closing:
                self.parked = False
                self.broker.register(self.stdout, self._on_stdout)

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
            self.closing = True  # first: from now on nobody parks or registers stdout
        broker = self.broker
        for pipe in (proc.stdout, proc.stderr):
            broker.unregister(pipe)
        with self.state_lock:
            me = threading.get_ident()
            if self.direct_reader == me or self.pumping == me:
                _close_quietly(proc.stdout)  # this thread reads it, and is not inside a read
            elif self.read_lock.acquire(blocking=False):
                self._let_go_of_stdout()  # nobody reads it: closed now
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


class ReplyReader(object):
    """A thread that reads, itself, the replies to calls it made on many connections.

    The group dispatcher uses it (see Connection.call for one connection):
    replies settle their futures on the waiting thread instead of the
    broker's, so no reply costs a thread switch, nor two threads contending
    for the GIL.  Connections whose transport cannot be taken (paramiko,
    relays) stay with the broker; ``wake()`` lets any other thread interrupt
    ``wait()``.
    """

    def __init__(self):
        self.poller = select.poll()
        self.taken = {}  # stdout fd -> connection
        self.fds = {}    # connection -> stdout fd
        self.borrowed = set()  # connections this thread already read for another reader
        self.wake_r, self.wake_w = os.pipe()
        # wake() may come from another thread after close(), when a late
        # event is posted (a connect that outlived its call's timeout):
        # it must not write to the closed fd's number, now maybe another file's.
        self.wake_lock = threading.Lock()
        self.closed = False
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poller.register(self.wake_r, select.POLLIN)

    def take(self, conn):
        """Read ``conn``'s replies on this thread from now on, if it can be done."""
        if conn in self.fds:
            return True
        take = getattr(conn, 'take_reading', None)  # not a relayed connection's
        taken = take is not None and take()
        if not taken:
            return False
        if taken is not True:
            self.borrowed.add(conn)  # an outer reader on this thread gives it back
        fd = conn.transport.stdout.fileno()
        self.taken[fd] = conn
        self.fds[conn] = fd
        self.poller.register(fd, select.POLLIN)
        return True

    def give_back(self, conn):
        fd = self.fds.pop(conn, None)
        if fd is not None:
            del self.taken[fd]
            self.poller.unregister(fd)
            if conn in self.borrowed:
                self.borrowed.discard(conn)
            else:
                conn.give_back_reading()

    def wait(self, timeout):
        """Read and dispatch what arrives within ``timeout`` seconds, or until woken."""
        ready = self.poller.poll(None if timeout is None else timeout * 1000.0)
        buf = _reading_buffer()
        for fd, _ in ready:
            if fd == self.wake_r:
                try:
                    os.read(fd, 4096)
                except BlockingIOError:
                    pass
                continue
            conn = self.taken.get(fd)
            if conn is not None and not conn.transport.read_once(conn, buf):
                self.give_back(conn)  # EOF: the connection is lost

    def wake(self):
        with self.wake_lock:
            if self.closed:
                return
            try:
                os.write(self.wake_w, b'.')
            except BlockingIOError:
                pass  # already awake

    def close(self):
        for conn in list(self.fds):
            self.give_back(conn)
        with self.wake_lock:
            self.closed = True
            os.close(self.wake_r)
            os.close(self.wake_w)


_thread_state = threading.local()


def _reading_buffer():
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


# --- pending requests --------------------------------------------------------------

class _OneReply(object):
    """Handling of a call's one reply, RESULT or ERROR: ``frame`` and ``fail``
    settle it through ``settle(value, exc)``; ``conn`` names the host in errors."""
    __slots__ = ()

    def frame(self, op, payload):
        if op == wire.RESULT:
            self.settle(codec.decode(payload), None)
        elif op == wire.ERROR:
            self.settle(None, self.conn.remote_exception(payload))
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
        self.rid = None

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
    """Items of a remote generator, queued for the consuming thread."""

    _END = object()

    def __init__(self, conn, what):
        self.conn = conn
        self.what = what
        self.items = collections.deque()
        self.cond = threading.Condition(threading.Lock())

    def frame(self, op, payload):
        if op == wire.ITEM:
            item = (codec.decode(payload), None)
        elif op == wire.END:
            item = (self._END, None)
        elif op == wire.ERROR:
            item = (self._END, self.conn.remote_exception(payload))
        else:
            return False
        with self.cond:
            self.items.append(item)
            self.cond.notify()
        return op != wire.ITEM

    def fail(self, exc):
        with self.cond:
            self.items.append((self._END, exc))
            self.cond.notify()

    def next(self, timeout):
        with self.cond:
            if not self.cond.wait_for(lambda: self.items, timeout):
                raise CallTimeout('[%s] no item from %s within %ss' % (self.conn.host, self.what, timeout))
            return self.items.popleft()


class StreamHandler(CallHandler):
    """A call fed by an input stream: tracks how many bytes the remote consumed."""

    __slots__ = ('window', 'in_flight', 'cond')

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


# --- the connection ------------------------------------------------------------------

class Connection(object):
    def __init__(self, host, transport, settings=None, keepalive=None):
        self.host = host
        self.keepalive = keepalive  # seconds, or None: see check_alive
        self.last_rx = self.last_ping = 0.0  # time.monotonic() of the last bytes in, last PING
        self.abort_error = None  # why the connection was declared dead, if it was
        self.transport = transport
        self.settings = dict(settings or {})
        self.settings.setdefault('host', host)
        self.settings.setdefault('log_level', logging.getLogger().getEffectiveLevel())
        self.parser = wire.FrameParser(self.settings.get('max_frame', MAX_FRAME))
        self.backlog = collections.deque()  # frames read, not yet dispatched (see feed)
        self.pending = {}
        self.ids = itertools.count(1)
        self.futures_condition = threading.Condition()  # shared by its CallFutures
        self.write_lock = threading.Lock()
        self.outbox = []  # corked frames, sent by the broker thread (see send_parts)
        self.flushing = False  # a helper thread is sending the outbox (see flush)
        self.modules = server_for_this_process()
        self.preloaded = set()  # modules of functions called so far (see send_modules_for)
        self.hello = threading.Event()
        self.remote = None  # the agent's HELLO: pid, python, version, platform, hostname
        self.closed = False
        self.error = None
        self.stderr_tail = bytearray()
        self.stderr_partial = bytearray()
        self.output_started = False  # the agent's mark came on stderr (see feed_stderr)
        self.log_names = set()  # logger names this remote used (see _log)
        self.import_slots = threading.BoundedSemaphore(IMPORTS_IN_FLIGHT)

    # --- lifecycle
    def start(self, timeout):
        self.launch()
        self.wait_started(timeout)

    def launch(self):
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

    def wait_started(self, timeout):
        """Wait for the agent's HELLO; ConnectError if it does not come."""
        if not self.hello.wait(timeout):
            self.close()
            raise ConnectError(self.host, 'no answer from the remote python within %ss' % timeout,
                               self.stderr_text())
        if self.remote is None:
            self.close()
            reason = self.error.args[0] if isinstance(self.error, ProtocolError) else \
                'the remote process exited before the agent started'
            raise ConnectError(self.host, reason, self.stderr_text())
        if self.keepalive:
            self.last_rx = time.monotonic()
            _keepalive_watch.add(self)

    def close(self):
        self.lost(TunnelClosed('[%s] tunnel closed' % self.host))

    def abandon(self):
        """End the transport at once, taking no lock (interpreter exit)."""
        self.closed = True
        self._kill_transport()

    def lost(self, exc):
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
            _keepalive_watch.remove(self)
        self.transport.close()
        self.hello.set()
        pending, self.pending = self.pending, {}
        for handler in pending.values():
            handler.fail(exc)
        self._flush_stderr_line()

    def eof(self):
        tail = self.stderr_text().strip().splitlines()
        detail = (': ' + tail[-1]) if tail else ''
        self.lost(TunnelClosed('[%s] connection lost%s' % (self.host, detail)))

    def stderr_text(self):
        return self.stderr_tail.decode('utf-8', 'replace')

    # --- incoming (broker thread)
    def feed(self, data, n=None):
        """Dispatch the frames in ``data``, or in its first ``n`` bytes (see FrameParser.feed)."""
        if self.keepalive:  # only it looks: the clock costs a reply in a fan-out half a microsecond
            self.last_rx = time.monotonic()
        # Frames go through one queue: a future's done-callback may make a
        # call on this tunnel and read its reply on this same thread, inside
        # this loop; it dispatches what it reads after what is queued here,
        # so the frames of a generator, say, keep their order.
        backlog = self.backlog
        try:
            backlog.extend(self.parser.feed(data, n))
            while backlog:
                rid, op, payload = backlog.popleft()
                self.dispatch(rid, op, payload)
        except (wire.FrameError, codec.DecodeError, KeyError, TypeError, ValueError) as e:
            backlog.clear()
            self.lost(ProtocolError('[%s] the remote sent invalid data (%s: %s); '
                                    'the tunnel was closed' % (self.host, type(e).__name__, e)))

    def dispatch(self, rid, op, payload):
        handler = self.pending.get(rid)
        if handler is not None and op in (wire.RESULT, wire.ERROR, wire.ITEM, wire.END, wire.CREDIT):
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
            self._log(codec.decode(payload))
        elif op == wire.HELLO:
            self.remote = codec.decode(payload)
            if not isinstance(self.remote, dict):
                raise ValueError('bad HELLO')
            self.modules.remote_magic = self.remote.get('magic')
            self.hello.set()
        elif op in (wire.RESULT, wire.ERROR, wire.ITEM, wire.END, wire.CREDIT, wire.PONG):
            pass  # a reply to a request that timed out or was abandoned
        else:
            raise ValueError('unexpected op %d' % op)

    def feed_stderr(self, data):
        if self.keepalive:
            self.last_rx = time.monotonic()
        tail = self.stderr_tail
        tail += data
        if not self.output_started:
            # Only kept, for a ConnectError, until the agent's mark: then
            # what follows it is the program's output (wire.AGENT_STARTED).
            at = tail.find(wire.AGENT_STARTED)
            data = b''
            if at >= 0:
                self.output_started = True
                del tail[at:at + len(wire.AGENT_STARTED)]
                data = bytes(tail[at:])
        if len(tail) > STDERR_TAIL:
            del tail[:len(tail) - STDERR_TAIL]
        if not data:
            return
        partial = self.stderr_partial
        partial += data
        relay = output_relay()
        if not relay.has_room():
            # Our stderr is not keeping up: count the lines instead of decoding them.
            relay.drop(self.host, partial.count(b'\n'))
            del partial[:partial.rfind(b'\n') + 1]
            if len(partial) > STDERR_LINE_MAX:
                relay.drop(self.host, 1)
                partial.clear()
            return
        lines = partial.split(b'\n')
        partial[:] = lines.pop()
        if len(partial) > STDERR_LINE_MAX:
            lines.append(bytes(partial))
            partial.clear()
        if lines:
            prefix = '[%s] ' % self.host
            text = ''.join(prefix + line.decode('utf-8', 'replace') + '\n' for line in lines)
            relay.text(self.host, text, len(lines))

    def _flush_stderr_line(self):
        if self.output_started and self.stderr_partial:
            self.feed_stderr(b'\n')

    def _serve_import(self, rid, query):
        try:
            reply = self.modules.handle(query)
            self.send(rid, wire.MODULE, reply)
        except TunnelClosed:
            pass
        finally:
            self.import_slots.release()

    def _log(self, record):
        if not isinstance(record, dict):
            raise ValueError('bad log record')
        allowed = {'name', 'levelno', 'msg', 'pathname', 'lineno', 'funcName', 'created',
                   'threadName', 'process', 'exc_text'}
        fields = {k: v for k, v in record.items() if k in allowed}
        levelno = fields.get('levelno')
        if not isinstance(levelno, int) or not isinstance(fields.get('name'), str):
            raise ValueError('bad log record')
        fields['levelname'] = logging.getLevelName(levelno)
        fields['msg'] = '[%s] %s' % (self.host, fields.get('msg'))
        fields['args'] = None
        fields['host'] = self.host
        # Loggers live as long as the process, with a placeholder for each dotted
        # prefix: a remote must not make us create unboundedly many or long ones.
        name = fields['name']
        if name not in self.log_names:
            if len(name) > LOGGER_NAME_MAX or len(self.log_names) >= LOGGER_NAMES_MAX:
                name = fields['name'] = REMOTE_LOGGER
            self.log_names.add(name)
        logger = logging.getLogger(name)
        if logger.isEnabledFor(levelno):
            output_relay().log(self.host, logger, logging.makeLogRecord(fields))

    def remote_exception(self, payload):
        info = codec.decode(payload)
        if not isinstance(info, dict):
            raise ValueError('bad error reply')
        return RemoteException(self.host, str(info.get('type')), str(info.get('msg')),
                               str(info.get('traceback') or ''))

    # --- outgoing (callers' threads)
    def send(self, rid, op, payload):
        if len(payload) <= CORK_MAX:
            self._send_frame([wire.frame(rid, op, payload)], len(payload))
        else:
            self.send_parts(rid, op, [payload])

    def send_parts(self, rid, op, parts):
        frame = wire.frame_parts(rid, op, parts)
        self._send_frame(frame, sum(len(p) for p in frame))

    def send_region(self, rid, region):
        """A DATA frame of a FileRegion: the transport sends it from the file
        when it can (``write_file``), else its bytes go like any frame's."""
        if region.length <= CORK_MAX or getattr(self.transport, 'write_file', None) is None or \
                self.transport.direct_reader == threading.get_ident():
            # (Small ones may be corked; a thread that reads the replies must
            # not block writing: see _send_frame.)
            self.send_parts(rid, wire.DATA, [region.read()])
        else:
            self._send_frame([wire.HEADER.pack(region.length, rid, wire.DATA), region],
                             wire.HEADER.size + region.length)

    def _send_frame(self, frame, size):
        with self.write_lock:
            if self.closed:
                raise self._closed_error()
            # Corking: while other requests are in flight, small frames wait
            # for the broker thread, which sends all that queued up in one
            # write.  An idle tunnel writes at once, for the lowest latency.
            if size <= CORK_MAX and len(self.pending) > 1:
                outbox = self.outbox
                # The caller may reuse its buffer once we return (call_stream
                # chunks do): keep a copy of anything that is not immutable bytes.
                outbox.extend(p if type(p) is bytes else bytes(p) for p in frame)
                if len(outbox) == len(frame):
                    get_broker().request_flush(self.flush)
                return
            if self.outbox:
                frame = self.outbox + frame
                self.outbox = []
            try:
                if getattr(self.transport, 'direct_reader', None) == threading.get_ident():
                    # This thread reads the replies (see call): it must not
                    # block here, so a helper thread sends what is left.
                    rest = self.transport.write_nowait(frame)
                    if rest:
                        self.outbox = list(rest)
                        self._flush_later()
                else:
                    self.transport.write(frame)
            except (OSError, ValueError) as e:
                write_error = e
            else:
                return
        self._write_failed(write_error)
        raise self._closed_error()

    def flush(self):
        """Send the corked frames (on the broker thread).

        The broker serves every tunnel, so it must never wait for this one:
        when the host is not taking bytes (frozen, or behind a stalled link)
        or another thread is writing, what is left goes to a helper thread.
        """
        if not self.write_lock.acquire(blocking=False):
            self._flush_later()
            return
        write_error = None
        try:
            batch, self.outbox = self.outbox, []
            if not batch or self.closed:
                return
            write_nowait = getattr(self.transport, 'write_nowait', None)
            try:
                rest = write_nowait(batch) if write_nowait is not None else batch
            except (OSError, ValueError) as e:
                write_error = e
            else:
                if rest:
                    # Callers put the outbox before what they write: order is kept.
                    self.outbox = list(rest)
                    self._flush_later()
        finally:
            self.write_lock.release()
        if write_error is not None:
            self._write_failed(write_error)

    def _write_failed(self, error):
        """A write to the host failed: the connection is lost."""
        if self.remote is None:
            # Before the HELLO, the remote most likely exited (ssh was refused,
            # say): its last words on stderr say why, and closing the pipes now
            # could lose them.  wait_started ends the connection instead, at
            # stdout's EOF (stderr read first) or at the connect timeout.
            return
        self.lost(TunnelClosed('[%s] connection lost: %s' % (self.host, error)))

    def _flush_later(self):
        if self.flushing:
            return
        self.flushing = True
        threading.Thread(target=self._flush_blocking, name='chopsticks-flush', daemon=True).start()

    def _flush_blocking(self):
        with self.write_lock:
            self.flushing = False
            batch, self.outbox = self.outbox, []
            if not batch or self.closed:
                return
            try:
                self.transport.write(batch)
                return
            except (OSError, ValueError) as e:
                write_error = e
        self._write_failed(write_error)

    # --- keepalive (on the keepalive thread, see KeepaliveWatch)
    def check_alive(self, now):
        """Ping a connection quiet for half its keepalive interval; declare it
        lost when it stays quiet for the whole interval despite the ping.

        Any bytes from the host (a reply, a PONG, stderr) count as life.  A
        ping is only sent when it cannot block (the write lock is free and the
        host takes bytes): while a large write is stuck, ssh's own
        ServerAliveInterval, set from the same keepalive, watches the link.
        """
        quiet = now - self.last_rx
        if self.closed or quiet < self.keepalive / 2.0:
            return
        if self.last_ping <= self.last_rx:
            self._ping(now)
        elif quiet >= self.keepalive:
            self.abort_error = TunnelClosed(
                '[%s] connection lost: no reply to a keepalive ping within %gs '
                '(the host or the link stopped responding)' % (self.host, self.keepalive))
            _keepalive_watch.remove(self)
            threading.Thread(target=self._abort, name='chopsticks-abort', daemon=True).start()

    def _ping(self, now):
        write_nowait = getattr(self.transport, 'write_nowait', None)
        if write_nowait is None or not self.write_lock.acquire(blocking=False):
            return
        write_error = None
        try:
            if self.closed or self.outbox:  # the outbox may hold half a frame
                return
            try:
                rest = write_nowait([wire.frame(0, wire.PING)])
            except (OSError, ValueError) as e:
                write_error = e
            else:
                if len(rest) and sum(map(len, rest)) == wire.HEADER.size:
                    return  # nothing went out: try again at the next tick
                self.last_ping = now
                if rest:
                    self.outbox = list(rest)
                    self._flush_later()
        finally:
            self.write_lock.release()
        if write_error is not None:
            self._write_failed(write_error)

    def _abort(self):
        # Killing the transport first unblocks any thread stuck writing to it.
        self._kill_transport()
        self.lost(self.abort_error)

    def _kill_transport(self):
        kill = getattr(self.transport, 'kill', None)
        if kill is not None:
            try:
                kill()
            except Exception:
                log.debug('chopsticks: killing the transport of %s failed', self.host, exc_info=True)

    def _closed_error(self):
        exc = self.error
        if isinstance(exc, TunnelClosed):
            return type(exc)(*exc.args)
        return TunnelClosed('[%s] tunnel is closed' % self.host)

    def request(self, op, handler, fn, args, kwargs):
        """Send a call and register its handler; returns the request id."""
        return self.request_payload(op, handler, self.pickle_call(fn, args, kwargs))

    def request_payload(self, op, handler, payload):
        """Send an already pickled call (``dumps_call``) and register its handler."""
        if len(payload) > self.parser.max_payload:  # the agent would refuse the frame
            raise ValueError('[%s] the call is %d bytes pickled, more than the %d a frame may carry: '
                             'send big data with put() or call_stream()'
                             % (self.host, len(payload), self.parser.max_payload))
        rid = next(self.ids)
        self.pending[rid] = handler
        if getattr(self.transport, 'parked', False):
            self.transport.unpark()  # the broker reads this reply (after pending: see call)
        try:
            self.send(rid, op, payload)
        except TunnelClosed:
            self.pending.pop(rid, None)
            raise
        return rid

    def call_async(self, fn, args, kwargs):
        future = CallFuture(self, fn)
        self.request(wire.CALL, future, fn, args, kwargs)
        return future

    def call_async_payload(self, payload, what):
        """Like ``call_async`` for a call pickled once by ``dumps_call(..., remote_version=None)``
        and sent to many connections (``what`` names it in errors)."""
        future = CallFuture(self, what)
        self.request_payload(wire.CALL, future, payload)
        return future

    def call_payload_then(self, payload, what, callback):
        """Like ``call_async_payload``, but the outcome goes to
        ``callback(value, exc)``, on the thread that reads the reply;
        returns a ReplyCallback (``done()``, ``cancel()``)."""
        reply = ReplyCallback(self, what, callback)
        reply.rid = self.request_payload(wire.CALL, reply, payload)
        return reply

    def call(self, fn, args, kwargs, timeout=None):
        # The pipe is taken before the call goes out, so the broker thread
        # never wakes for the reply: this thread reads it.
        reading = self.take_reading()
        if not reading and on_broker_thread():
            raise self._waiting_for_itself(describe(fn))
        reply = ReplyHandler(self, fn)
        try:
            rid = self.request(wire.CALL, reply, fn, args, kwargs)
        except BaseException:
            if reading is True:
                self.give_back_reading()
            raise
        left = self._read_until_done(reply, timeout, reading is True) if reading else timeout
        if not reply.wait(left):
            self.pending.pop(rid, None)
            raise CallTimeout('[%s] %s did not finish within %ss' % (self.host, describe(fn), timeout))
        value, error = reply.outcome
        if error is not None:
            raise error
        return value

    def wait(self, future, timeout, what):
        """The result of ``future`` (a CallFuture reads its own reply), or
        CallTimeout naming ``what``."""
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise CallTimeout('[%s] %s did not finish within %ss' % (self.host, what, timeout))

    def read_for(self, future, timeout):
        """Read replies on this thread until ``future`` is done, if the
        transport lets this thread read (else whoever reads settles it).
        Returns what is left of ``timeout``."""
        reading = self.take_reading()
        if not reading:
            if on_broker_thread() and not future.done():
                raise self._waiting_for_itself(getattr(future, 'what', 'a call'))
            return timeout
        return self._read_until_done(future, timeout, reading is True)

    def _waiting_for_itself(self, what):
        # The broker reads this tunnel's replies, and it is the thread that
        # would wait: every tunnel would stop with it.
        what = what if isinstance(what, str) else describe(what)
        return RuntimeError(
            '[%s] cannot wait for %s from a callback running on chopsticks\' I/O thread: '
            'that thread reads this tunnel\'s replies, so it would wait for itself and stop '
            'every tunnel; use call_async, or wait from another thread' % (self.host, what))

    def _read_until_done(self, future, timeout, give_back=True):
        """Read (this thread has the reading) until ``future`` is done or
        ``timeout`` passes, then give the reading back if this call took it;
        returns what is left of ``timeout``.  Not done yet: the time is up,
        or the tunnel is closing (and is about to fail it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if self.outbox:
                # What is corked goes out now, not when the broker gets to it:
                # we are about to wait for it (and may be the broker thread).
                self.flush()
            self.transport.read_until(self, future, timeout)
        finally:
            if give_back:
                self.give_back_reading()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def take_reading(self):
        """This thread reads the replies from now on, if the transport allows
        it: see ProcessTransport.take_stdout for what it returns."""
        take = getattr(self.transport, 'take_stdout', None)
        return take is not None and take()

    def give_back_reading(self):
        """The broker reads the replies again (after ``take_reading``)."""
        # Parked, so a next call takes it back cheaply; but if another thread's
        # request went out meanwhile, the broker reads its reply.  (parked is
        # set before pending is looked at, and request_payload does the
        # reverse: one of us sees the other.)
        self.transport.give_back_stdout()
        if self.pending:
            self.transport.unpark()

    def pickle_call(self, fn, args, kwargs):
        try:
            payload = dumps_call(fn, args, kwargs, self.remote and self.remote.get('version'))
        except (TypeError, ValueError, AttributeError, RecursionError, pickle.PicklingError) as e:
            # Same type, so callers catching it still do; the message says where and what.
            try:
                error = type(e)('[%s] cannot send the call to %s: %s' % (self.host, describe(fn), e))
            except Exception:
                raise e
            raise error from e
        self.send_modules_for(fn)
        return payload

    def send_modules_for(self, fn):
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

    def call_iter(self, fn, args, kwargs, timeout=None):
        return self.call_iter_payload(self.pickle_call(fn, args, kwargs), describe(fn), timeout)

    def call_iter_payload(self, payload, what, timeout=None):
        """Iterate over the items of a remote generator call pickled by ``dumps_call``."""
        if on_broker_thread():  # the items would come through this very thread
            raise self._waiting_for_itself(what)
        handler = IterHandler(self, what)
        rid = self.request_payload(wire.CALL_ITER, handler, payload)
        consumed = 0
        finished = False
        try:
            while True:
                item, exc = handler.next(timeout)
                if item is IterHandler._END:
                    finished = True
                    if exc is not None:
                        raise exc
                    return
                yield item
                consumed += 1
                if consumed >= ITER_CREDIT_BATCH:
                    self.send(rid, wire.CREDIT, codec.encode(consumed))
                    consumed = 0
        finally:
            if not finished:
                self.pending.pop(rid, None)
                try:
                    self.send(rid, wire.CANCEL, b'')
                except TunnelClosed:
                    pass

    def call_stream(self, fn, chunks, args, kwargs, timeout=None):
        """Call ``fn(stream, *args, **kwargs)`` remotely, feeding ``chunks`` to ``stream``."""
        return self.call_stream_payload(self.pickle_call(fn, args, kwargs), chunks,
                                        describe(fn), timeout)

    def wide_pipe(self, direction):
        """A context manager for a bulk transfer: ``'send'`` or ``'receive'``
        (see wire.WidePipe).  Transports without pipes change nothing."""
        widen = getattr(self.transport, 'wide_pipe', None)
        return widen(direction) if widen is not None else wire.WidePipe(None)

    def call_stream_payload(self, payload, chunks, what, timeout=None):
        if on_broker_thread():  # the host's credits would come through this very thread
            raise self._waiting_for_itself(what)
        handler = StreamHandler(self, what)
        rid = self.request_payload(wire.CALL_STREAM, handler, payload)
        error = None
        try:
            with self.wide_pipe('send'):
                for chunk in chunks:
                    if type(chunk) is FileRegion:
                        pieces = (FileRegion(chunk.fd, chunk.offset + start,
                                             min(STREAM_CHUNK, chunk.length - start))
                                  for start in range(0, chunk.length, STREAM_CHUNK))
                    else:
                        view = memoryview(chunk).cast('B')
                        pieces = (view[start:start + STREAM_CHUNK]
                                  for start in range(0, len(view), STREAM_CHUNK))
                    for piece in pieces:
                        with handler.cond:
                            handler.cond.wait_for(
                                lambda: handler.in_flight < STREAM_WINDOW or handler.future.done())
                            if handler.future.done():
                                break
                            handler.in_flight += len(piece)
                        if type(piece) is FileRegion:
                            self.send_region(rid, piece)
                        else:
                            self.send_parts(rid, wire.DATA, [piece])
                    if handler.future.done():
                        break
        except BaseException as e:
            error = '%s: %s' % (type(e).__name__, e)
            self._end_stream(rid, error)
            if isinstance(e, Exception):
                # The host undoes what it did (a put removes its temp file)
                # when it reads the abort: a caller who sees this error finds
                # nothing left.  Not for Ctrl-C, which leaves at once.
                try:
                    self.wait(handler.future, STREAM_ABORT_WAIT, what)
                except Exception:
                    pass
            raise
        self._end_stream(rid, None)
        return self.wait(handler.future, timeout, what)

    def _end_stream(self, rid, error):
        if not self.closed:
            self.send(rid, wire.DATA_END, codec.encode(error))

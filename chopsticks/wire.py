"""Framing and message types, shared by the controller and the remote agent.

A frame is a 9-byte header (payload length, request id, op) and the payload.
Many requests are in flight at once; the request id pairs replies with
requests.  Payloads the remote sends are always in the safe codec
(``chopsticks.codec``); the controller sends pickled calls (that direction is
trusted) and codec-encoded control messages.

Shipped to the remote as source: stdlib only, Python 3.6.
"""
import mmap
import os
import struct
import sys
import threading

HEADER = struct.Struct('<IIB')  # payload length, request id, op

# controller -> remote
CALL = 1         # pickle (fn, args, kwargs); answered by RESULT or ERROR
CALL_ITER = 2    # the same, fn returns an iterable; answered by ITEM* then END or ERROR
CALL_STREAM = 3  # the same, fn(chunks, *args); followed by DATA* and DATA_END
DATA = 4         # raw bytes for the input stream of request id
DATA_END = 5     # input stream finished (payload: codec None, or an error message)
CREDIT = 6       # codec int: the receiver may send this many more ITEMs / DATA bytes
CANCEL = 7       # stop producing items for request id
MODULE = 8       # zlib(codec) reply to IMPORT
PING = 9         # liveness probe: the remote answers PONG
CONFIG = 10      # codec dict: the agent's settings, the first frame it reads
MODULES = 11     # zlib(codec) like MODULE, unasked: modules a call about to come will import

# remote -> controller
RESULT = 20      # codec value
ERROR = 21       # codec dict: type, msg, traceback
ITEM = 22        # codec value produced by a CALL_ITER generator
END = 23         # generator exhausted
IMPORT = 24      # codec tuple: ('module', name) or ('data', path) or ('list', path)
LOG = 25         # codec dict describing a logging.LogRecord
HELLO = 26       # codec dict: the agent is ready (pid, python, ...)
PONG = 27

# Written by the agent on its stderr just before HELLO: what the host wrote
# there before it (ssh warnings, a shell's complaint) is the transport's and
# goes into a ConnectError; what comes after is the remote program's output,
# shown.  On stderr itself, since stdout and stderr are read apart, and ssh
# keeps no order between them.
AGENT_STARTED = b'\0chopsticks agent started\0'

OP_NAMES = {v: k for k, v in globals().items() if k.isupper() and isinstance(v, int)}


class FrameError(Exception):
    """The byte stream is not valid framing."""


DIRECT_READ_MIN = 64 << 10  # a frame this large may be read straight into place


class FrameParser(object):
    """Incremental frame splitter: feed bytes, get complete frames back.

    ``max_payload`` bounds what a peer can make us buffer for one frame,
    and ``first_max``, if given, the first frame alone (``first_name`` in
    the error): the controller expects a HELLO of a few hundred bytes
    first, and without it a hostile host made it buffer a 256 MiB "HELLO"
    before refusing it.
    A payload that arrives whole inside one ``feed`` is copied once (bytes).
    One that spans several is handed on as a memoryview of the bytearray
    that gathered it (no second copy).

    That bytearray grows with what arrived, unless the payload is between
    DIRECT_READ_MIN and ``preallocate`` bytes: then it is allocated at the
    announced size, and ``room()``/``filled()`` let the reader read the rest
    straight into place, so a fetched or put megabyte is copied by the
    kernel only.  ``preallocate`` is what a peer may make us allocate before
    it sends the bytes: the agent trusts its controller with everything; the
    controller trusts a host with nothing (there, most frames of a fetch
    arrive whole in one read anyway).

    Such a buffer is an anonymous mmap, taken from ``spare`` when one there
    has the size: whoever is done with a frame may ``give_back`` its payload
    (a put's reader does, chunk after chunk).  A fresh bytearray of a
    megabyte per frame cost the agent a memset and, from glibc's heap, about
    one page fault in four pages: 6-7% of its CPU in a 256 MiB put.
    """

    SPARE_MAX = 4  # recycled buffers kept; a put cycles two or three

    def __init__(self, max_payload, preallocate=0, first_max=None, first_name='first frame'):
        self.max_payload = max_payload if first_max is None else first_max
        self.max_after_first = None if first_max is None else max_payload
        self.first_name = first_name
        self.preallocate = preallocate
        self.spare = []  # mmaps given back, for the next frames of their size
        self.buf = bytearray()  # the pending bytes of an incomplete frame
        self.need = HEADER.size  # len(buf) at which the pending frame is complete
        self.have = None  # bytes of buf filled, when buf was allocated at full size

    def room(self):
        """A writable view where the next read should go, or None: read into
        your own buffer and ``feed`` it."""
        if self.have is None:
            return None
        return memoryview(self.buf)[self.have:]

    def filled(self, n):
        """``n`` bytes were read into ``room()``: the frames now complete."""
        self.have += n
        return [self._complete()] if self.have == self.need else []

    def _complete(self):
        buf = self.buf
        _, rid, op = HEADER.unpack_from(buf, 0)
        self.buf = bytearray()
        self.need = HEADER.size
        self.have = None
        return rid, op, memoryview(buf)[HEADER.size:]

    def _read_in_place(self):
        """Whether the pending frame (its length known) gets a buffer of its full size."""
        return DIRECT_READ_MIN <= self.need - HEADER.size <= self.preallocate

    def _preallocate(self, pending):
        """Continue the frame begun with ``pending`` in a buffer of its full size."""
        try:
            buf = self.spare.pop()  # (given back from another thread: pop, then look)
        except IndexError:
            buf = None
        if buf is None or len(buf) != self.need:
            buf = aligned_buffer(self.need)
        buf[:len(pending)] = pending
        self.buf = buf
        self.have = len(pending)

    def give_back(self, payload):
        """``payload``, a frame from ``filled``/``feed``, is no longer used by
        anyone: its buffer may hold a later frame.  Anything else is ignored."""
        buf = getattr(payload, 'obj', None)
        if type(buf) is mmap.mmap and len(self.spare) < self.SPARE_MAX:
            self.spare.append(buf)

    def drop_spares(self):
        """Free the recycled buffers (a transfer ended)."""
        del self.spare[:]

    def feed(self, data, n=None):
        """The frames that ``data``, or its first ``n`` bytes, complete.

        A reader passes its buffer and the bytes it read: in the commonest
        read, one whole frame with nothing pending, no view of the buffer is
        made (views cost an agent in a fan-out a microsecond a call).
        """
        size = HEADER.size
        if n is None:
            n = len(data)
        if not self.buf and self.have is None and n >= size:
            length, rid, op = HEADER.unpack_from(data, 0)
            if length == n - size and length <= self.max_payload:
                if self.max_after_first is not None:
                    self._lift_first_max()
                return [(rid, op, bytes(data[size:n]))]
        frames = []
        view = memoryview(data)[:n]
        if self.have is None and self.buf:
            # Complete the pending frame with as few bytes of data as it needs.
            buf = self.buf
            if len(buf) < size:
                take = min(size - len(buf), len(view))
                buf += view[:take]
                view = view[take:]
                if len(buf) < size:
                    return frames
                self.need = size + self._checked(HEADER.unpack_from(buf, 0)[0])
                if self._read_in_place():
                    self._preallocate(buf)
            if self.have is None:
                take = min(self.need - len(buf), len(view))
                buf += view[:take]
                view = view[take:]
                if len(buf) < self.need:
                    return frames
                frames.append(self._complete())
        if self.have is not None:
            take = min(self.need - self.have, len(view))
            self.buf[self.have:self.have + take] = view[:take]
            view = view[take:]
            frames.extend(self.filled(take))
            if self.have is not None:
                return frames
        pos = 0
        end = len(view)
        while end - pos >= size:
            length, rid, op = HEADER.unpack_from(view, pos)
            self._checked(length)
            start = pos + size
            if end - start < length:
                self.need = size + length
                break
            frames.append((rid, op, bytes(view[start:start + length])))
            pos = start + length
        if pos < end:
            if self._read_in_place():
                self._preallocate(view[pos:])
            else:
                self.buf += view[pos:]
        return frames

    def _checked(self, length):
        if length > self.max_payload:
            raise FrameError('%s of %d bytes exceeds the limit of %d bytes'
                             % ('frame' if self.max_after_first is None else self.first_name,
                                length, self.max_payload))
        if self.max_after_first is not None:
            self._lift_first_max()
        return length

    def _lift_first_max(self):
        self.max_payload, self.max_after_first = self.max_after_first, None


def aligned_buffer(size):
    """A zeroed, writable, page-aligned buffer of ``size`` bytes, for
    readers of bulk data: the controller's, and the agent's big frames
    (FrameParser, which recycles them).

    The kernel copies into an address that is not 32-byte aligned two to
    three times slower, and a bytearray's data starts 16 bytes into its
    allocation: reading a 256 MiB fetch into this costs the controller 10-15%
    less CPU (0.74-0.81 to 0.62-0.73 s, six interleaved runs).
    """
    return mmap.mmap(-1, size)


def frame(rid, op, payload=b''):
    """One frame as bytes (small payloads)."""
    return HEADER.pack(len(payload), rid, op) + payload


def frame_parts(rid, op, parts):
    """A header followed by the buffers of a large payload, for writev."""
    return [HEADER.pack(sum(len(p) for p in parts), rid, op)] + list(parts)


def byte_views(parts):
    """Byte views of ``parts`` for writev, leaving out empty ones (an empty
    buffer would make writev return 0 forever)."""
    return [v for v in (memoryview(p).cast('B') for p in parts) if len(v)]


def drop_written(views, n):
    """Remove the first ``n`` bytes, which writev wrote, from ``views`` (in place)."""
    while n:
        first = views[0]
        if n >= len(first):
            n -= len(first)
            views.pop(0)
        else:
            views[0] = first[n:]
            n = 0


def write_all(fd, parts):
    """Write every buffer in ``parts`` to a blocking fd, with as few syscalls as possible."""
    if len(parts) == 1:  # one small frame, as most replies are
        written = os.write(fd, parts[0])
        if written == len(parts[0]):
            return
        parts = [memoryview(parts[0])[written:]]
    views = byte_views(parts)
    while views:
        drop_written(views, os.writev(fd, views[:1024]))


# --- wider pipes for bulk transfers ----------------------------------------------

BULK_PIPE_SIZE = 256 << 10  # a pipe's capacity while a file streams through it
BULK_PIPES_MAX = 32         # pipes one process widens at a time (see WidePipe)
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032  # Linux; named in fcntl only from Python 3.10
RESTORE_PATIENCE = 0.5      # seconds to wait for a pipe to drain before narrowing it


class WidePipe(object):
    """``with WidePipe(fd):`` the pipe holds BULK_PIPE_SIZE bytes instead of
    the usual 64 KiB while a bulk transfer runs through it.

    Each side then moves four times more per system call and wake-up: on
    loopback put and fetch ran 15-20% faster over OpenSSH.  The old size
    comes back afterwards, and one process widens at most BULK_PIPES_MAX
    pipes at once, because Linux counts pipe capacity against a per-user
    limit (pipe-user-pages-soft, 64 MiB) past which every new pipe of that
    user, in any program, gets a page or two.  Where pipes cannot be resized
    (not Linux, the limit reached, not a pipe) nothing changes.
    """

    lock = threading.Lock()
    widened = 0

    def __init__(self, fd):
        self.fd = fd  # None: change nothing
        self.old_size = None
        self.pipe_inode = None  # which pipe ``fd`` was, to restore only that one

    def __enter__(self):
        if self.fd is None or not sys.platform.startswith('linux'):
            return self
        import fcntl
        cls = WidePipe
        with cls.lock:
            if cls.widened >= BULK_PIPES_MAX:
                return self
            cls.widened += 1
        try:
            self.pipe_inode = os.fstat(self.fd).st_ino
            old_size = fcntl.fcntl(self.fd, F_GETPIPE_SZ)
            if old_size < BULK_PIPE_SIZE:
                fcntl.fcntl(self.fd, F_SETPIPE_SZ, BULK_PIPE_SIZE)
                self.old_size = old_size
        except (OSError, ValueError):  # EPERM past the user's limit, EBADF when closed
            pass
        if self.old_size is None:
            with cls.lock:
                cls.widened -= 1
        return self

    def __exit__(self, *exc_info):
        if self.old_size is None:
            return
        import errno
        import fcntl
        import time
        # EBUSY while the pipe holds more than old_size: the last pieces of
        # the transfer are still in it, and its peer has to take them before
        # anything sent after them, so waiting for that costs nothing.  A peer
        # that stopped reading leaves it wide until the pipe is closed.
        delay = 0.0005
        deadline = time.monotonic() + RESTORE_PATIENCE
        while True:
            try:
                if os.fstat(self.fd).st_ino != self.pipe_inode:
                    break  # the pipe was closed, and its fd number is another file's now
                fcntl.fcntl(self.fd, F_SETPIPE_SZ, self.old_size)
            except OSError as e:
                if e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
                    continue
            except ValueError:  # closed meanwhile
                pass
            break
        with WidePipe.lock:
            WidePipe.widened -= 1
        self.old_size = None


class CombiningWriter(object):
    """Serialises writes to a blocking ``fd`` from many threads, merging
    those that queue up.

    The first thread to arrive writes; threads arriving meanwhile only queue
    their frames and return, and the writing thread sends everything queued
    with one writev.  Under load, many small frames cost one syscall (and one
    wake-up of the peer) instead of one each.  Queued bytes are bounded: past
    ``limit``, arriving threads wait for the writer to catch up.

    ``cork()`` holds what is written until ``uncork()`` (or until ``limit``
    bytes wait), for a thread about to run several calls in a row: their
    replies go out in one write too.

    ``write_frame()`` is the common case, one small frame while nobody else
    writes: written at once under ``lock``, with none of the bookkeeping.
    """

    SMALL = 4096  # write_frame() holds the lock for a write no larger (a pipe takes it whole)

    def __init__(self, fd, limit=16 << 20):
        self.fd = fd
        self.limit = limit
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)  # for threads waiting on a full queue
        self.waiters = 0
        self.queue = []
        self.queued = 0
        self.writing = False
        self.corked = False
        self.error = None

    def write_frame(self, data):
        """``write([data])`` for one bytes object.

        A small one, when no thread is writing or holding frames, is written
        right here, under ``lock``: one lock round trip and one syscall, the
        whole cost of an agent's reply to a call run alone.  (In the agents
        of a 48-host fan-out, whose caches the other processes keep cold, the
        general path cost 3 µs more per reply.)  A thread arriving meanwhile
        waits for that one small write instead of queueing behind it.
        """
        if len(data) <= self.SMALL:
            with self.lock:
                if not (self.writing or self.corked or self.queue or self.error is not None):
                    try:
                        write_all(self.fd, [data])
                    except BaseException as e:
                        self._fail(e)
                        raise
                    return
        self.write([data])

    def write(self, parts):
        with self.lock:
            if self.error is not None:
                raise self.error
            while self.writing and self.queued > self.limit:
                self.waiters += 1
                self.room.wait()
                self.waiters -= 1
                if self.error is not None:
                    raise self.error
            if self.writing or (self.corked and self.queued <= self.limit):
                self.queue.extend(parts)
                self.queued += sum(len(p) for p in parts)
                return
            self.writing = True
            batch = parts
            if self.queue:  # held by cork() and now past the limit: all of it goes, in order
                batch = self._take_queue() + list(parts)
        self._send(batch)

    def cork(self):
        with self.lock:
            self.corked = True

    def uncork(self):
        """Stop holding; what was held goes now (unless a writer is at work: it sends it)."""
        with self.lock:
            self.corked = False
            if self.writing or not self.queue or self.error is not None:
                return
            self.writing = True
            batch = self._take_queue()
        self._send(batch)

    def _take_queue(self):
        """(Under ``lock``.)  What is queued, leaving the queue empty."""
        batch, self.queue, self.queued = self.queue, [], 0
        return batch

    def _send(self, batch):
        """Write ``batch``, then what queued up meanwhile (this thread has ``writing``)."""
        try:
            while True:
                write_all(self.fd, batch)
                with self.lock:
                    if self.queue and (not self.corked or self.queued > self.limit):
                        batch = self._take_queue()
                    else:
                        batch = None
                        self.writing = False
                    if self.waiters:
                        self.room.notify_all()
                    if batch is None:
                        return
        except BaseException as e:
            with self.lock:
                self._fail(e)
            raise

    def _fail(self, exc):
        """(Under ``lock``.)  The fd is broken: drop what is queued; every later write raises."""
        self.error = exc if isinstance(exc, (OSError, ValueError)) else OSError(str(exc))
        self.writing = False
        self._take_queue()
        self.room.notify_all()

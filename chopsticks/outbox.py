"""Writing a connection's frames to its transport, corked when it pays.

Callers' threads write under one lock.  While other calls are in flight,
small frames are corked: they wait in the outbox for the broker thread,
which sends all that queued up in one write.  An idle tunnel writes at
once, for the lowest latency.  Neither the broker nor a thread that reads
its own replies ever blocks writing: what the transport does not take at
once goes to a helper thread.
"""
import threading
from typing import TYPE_CHECKING, Any, List, Optional

from . import wire
from .broker import get_broker
from .errors import TunnelClosed
from .transport import FileRegion, ReaderState

if TYPE_CHECKING:
    from .connection import Connection

CORK_MAX = 64 * 1024        # frames up to this size may wait to be sent together
# Import replies queued for a host that does not read them.  A whole
# closure is a few MiB at most (fabric and paramiko together: 2.6 MiB); a
# host with 64 MiB of answers unread stopped reading on purpose.
QUEUED_MAX = 64 << 20

_CALLER = ReaderState.CALLER


class Outbox(object):
    """The write side of a Connection: ``send``, ``send_parts``, ``send_region``."""

    def __init__(self, conn: 'Connection') -> None:
        self.conn = conn
        self.transport = conn.transport
        self.direct = conn.direct
        self.file_regions = conn.file_regions
        self.lock = threading.Lock()  # held while writing; the connection's write_lock
        self.frames: List[Any] = []  # corked frames, sent by the broker thread
        self.flushing = False  # a helper thread is sending them (see flush)
        # Whole frames from send_nowait, under their own short lock: whoever
        # writes next (a caller, the broker, the helper thread) sends them.
        self.queued: List[Any] = []
        self.queued_bytes = 0
        self.queued_lock = threading.Lock()

    def send_nowait(self, rid: int, op: int, payload: Any) -> None:
        """Queue a frame and return at once; it goes out with the next write.

        For the import pool, whose few threads serve every tunnel: a host
        that stops reading its stdin must not hold one of them in a write
        (issue 22: eight requests from one such host stalled every tunnel's
        imports).  Past QUEUED_MAX unread bytes the connection is lost.
        """
        frame = wire.frame_parts(rid, op, [payload])
        size = sum(len(p) for p in frame)
        with self.queued_lock:
            over = self.queued_bytes + size > QUEUED_MAX
            if not over:
                self.queued.extend(frame)
                self.queued_bytes += size
        if over:
            conn = self.conn
            conn.lost(TunnelClosed('[%s] the host stopped reading: more than %d MiB of import '
                                   'replies wait unread' % (conn.host, QUEUED_MAX >> 20)))
            return
        get_broker().request_flush(self.flush)

    def _take_queued(self) -> List[Any]:
        """The frames send_nowait queued (call with ``lock`` held)."""
        with self.queued_lock:
            queued, self.queued, self.queued_bytes = self.queued, [], 0
        return queued

    def send(self, rid: int, op: int, payload: Any) -> None:
        if len(payload) <= CORK_MAX:
            self.send_frame([wire.frame(rid, op, payload)], len(payload))
        else:
            self.send_parts(rid, op, [payload])

    def send_parts(self, rid: int, op: int, parts: List[Any]) -> None:
        frame = wire.frame_parts(rid, op, parts)
        self.send_frame(frame, sum(len(p) for p in frame))

    def send_region(self, rid: int, region: FileRegion) -> None:
        """A DATA frame of a FileRegion: the transport sends it from the file
        when it can (``file_regions``), else its bytes go like any frame's."""
        if region.length <= CORK_MAX or not self.file_regions or self._reads_here():
            # (Small ones may be corked; a thread that reads the replies must
            # not block writing: see send_frame.)
            self.send_parts(rid, wire.DATA, [region.read()])
        else:
            self.send_frame([wire.HEADER.pack(region.length, rid, wire.DATA), region],
                             wire.HEADER.size + region.length)

    def _reads_here(self):
        """Whether this thread took the transport to read its own replies."""
        direct = self.direct
        return direct is not None and direct.state is _CALLER and \
            direct.reader == threading.get_ident()

    def send_frame(self, frame: List[Any], size: int) -> None:
        """Send one frame, ``frame`` being its parts (header first) and
        ``size`` its payload's length; corked if small and other calls are
        pending.  TunnelClosed if the connection is gone."""
        conn = self.conn
        interrupted: Optional[BaseException] = None
        with self.lock:
            if conn.closed:
                raise conn.closed_error()
            if size <= CORK_MAX and len(conn.pending) > 1:
                frames = self.frames
                # The caller may reuse its buffer once we return (call_stream
                # chunks do): keep a copy of anything that is not immutable bytes.
                frames.extend(p if type(p) is bytes else bytes(p) for p in frame)
                if len(frames) == len(frame):
                    get_broker().request_flush(self.flush)
                return
            if self.frames or self.queued:
                frame = self.frames + self._take_queued() + frame
                self.frames = []
            try:
                direct = self.direct  # inlined _reads_here: this runs for every call
                if direct is not None and direct.state is _CALLER and \
                        direct.reader == threading.get_ident():
                    # This thread reads the replies (see Connection.call): it
                    # must not block here, so a helper thread sends what is left.
                    rest = self.transport.write_nowait(frame)
                    if rest:
                        self.frames = list(rest)
                        self._flush_later()
                else:
                    self.transport.write(frame)
            except (OSError, ValueError) as e:
                write_error = e
            except BaseException as e:  # Ctrl-C, most likely, while a big frame waited for the pipe
                interrupted = e
            else:
                return
        if interrupted is not None:
            # Part of the frame may have gone, and no count of it can be
            # trusted (the interrupt may fall between a write and its
            # bookkeeping); a host reading the next frame from its middle
            # would never be in step again: the next call on this tunnel
            # hung.  So the connection ends (the tunnel makes a new one at
            # its next call, and the agent removes its temp files as it
            # exits) and the interrupt goes on.
            conn.lost(TunnelClosed('[%s] connection ended: a write to it was interrupted (%s)'
                                   % (conn.host, type(interrupted).__name__)))
            raise interrupted
        self._write_failed(write_error)
        raise conn.closed_error()

    def flush(self) -> None:
        """Send the corked frames (on the broker thread).

        The broker serves every tunnel, so it must never wait for this one:
        when the host is not taking bytes (frozen, or behind a stalled link)
        or another thread is writing, what is left goes to a helper thread.
        """
        if not self.lock.acquire(blocking=False):
            self._flush_later()
            return
        write_error = None
        try:
            batch, self.frames = self.frames + self._take_queued(), []
            if not batch or self.conn.closed:
                return
            try:
                rest = self.transport.write_nowait(batch)
            except (OSError, ValueError) as e:
                write_error = e
            else:
                if rest:
                    # Callers put the outbox before what they write: order is kept.
                    self.frames = list(rest)
                    self._flush_later()
        finally:
            self.lock.release()
        if write_error is not None:
            self._write_failed(write_error)

    def _write_failed(self, error):
        """A write to the host failed: the connection is lost."""
        conn = self.conn
        if conn.remote is None:
            # Before the HELLO, the remote most likely exited (ssh was refused,
            # say): its last words on stderr say why, and closing the pipes now
            # could lose them.  wait_started ends the connection instead, at
            # stdout's EOF (stderr read first) or at the connect timeout.
            return
        conn.lost(TunnelClosed('[%s] connection lost: %s' % (conn.host, error)))

    def _flush_later(self):
        if self.flushing:
            return
        self.flushing = True
        threading.Thread(target=self._flush_blocking, name='chopsticks-flush', daemon=True).start()

    def _flush_blocking(self):
        with self.lock:
            self.flushing = False
            batch, self.frames = self.frames + self._take_queued(), []
            if not batch or self.conn.closed:
                return
            try:
                self.transport.write(batch)
                return
            except (OSError, ValueError) as e:
                write_error = e
        self._write_failed(write_error)

    def ping_nowait(self, now: float) -> bool:
        """Send a PING if it cannot block (keepalive): the lock is free and
        the host takes bytes now.  Whether it went out."""
        if not self.lock.acquire(blocking=False):
            return False
        write_error: Optional[BaseException] = None
        try:
            if self.conn.closed or self.frames:  # the outbox may hold half a frame
                return False
            try:
                rest = self.transport.write_nowait([wire.frame(0, wire.PING)])
            except (OSError, ValueError) as e:
                write_error = e
            else:
                if len(rest) and sum(map(len, rest)) == wire.HEADER.size:
                    return False  # nothing went out: try again at the next tick
                self.conn.last_ping = now
                if rest:
                    self.frames = list(rest)
                    self._flush_later()
                return True
        finally:
            self.lock.release()
        self._write_failed(write_error)
        return False

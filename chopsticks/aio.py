"""Calls awaited on an asyncio event loop: ``BaseTunnel.acall`` on a connected tunnel.

``asyncio.wrap_future`` over a call's concurrent future cost each reply two
thread hand-offs (the broker thread read it, then woke the loop through its
self-pipe) and the loop three callbacks more: 2,000 acalls in one
``gather`` ran at a quarter to a third of the rate of as many ``call_async``
on the same tunnel.  Here the loop's own thread reads the replies while it
awaits any, as a thread blocked in ``call`` does: it takes the transport's
stdout from the broker (``take_reading``), watches it with
``loop.add_reader``, and settles each asyncio future where it reads its
reply.  It gives stdout back once no reply is awaited.  When the transport
cannot be read that way (paramiko, a relay) or another thread reads it just
then, replies arrive from that thread in batches: one wake-up of the loop
for all the replies one read brought.
"""
import asyncio
import collections
import threading
import weakref

from .transport import ReaderState, TakeResult, reading_buffer

__all__ = ['LoopCalls', 'loop_calls']


class LoopCalls(object):
    """The calls one event loop awaits on one connection.  Used on the loop's thread."""

    def __init__(self, loop, conn):
        self.loop = loop
        self.conn = conn
        self.direct = getattr(conn, 'direct', None)  # None (paramiko, a relay): another thread reads
        self.thread = threading.get_ident()  # the loop's (made from a coroutine on it)
        self.awaited = 0  # calls sent whose reply has not been settled here
        self.fd = None    # stdout's file descriptor while this loop reads it
        self.inbox = collections.deque()  # (future, value, exc) read by other threads
        self.drain_scheduled = False

    def call(self, fn, args, kwargs):
        """Send ``fn(*args, **kwargs)``; an asyncio future of its value."""
        conn = self.conn
        payload = conn.pickle_call(fn, args, kwargs)
        future = self.loop.create_future()
        if self.fd is None and self.direct is not None:
            self._read_here()
        self.awaited += 1
        try:
            conn.call_then(payload, fn, lambda value, exc: self._settled(future, value, exc))
        except BaseException:
            self._one_less()
            raise
        return future

    def _settled(self, future, value, exc):
        """A reply, on the thread that read it."""
        if threading.get_ident() == self.thread:
            self._one_less()
            _set(future, value, exc)
            return
        self.inbox.append((future, value, exc))
        if not self.drain_scheduled:
            self.drain_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                pass  # the loop closed: nobody awaits these any more

    def _drain(self):
        # Unscheduled first: a reply appended from now on schedules another drain.
        self.drain_scheduled = False
        inbox = self.inbox
        while inbox:
            future, value, exc = inbox.popleft()
            self._one_less()
            _set(future, value, exc)

    def _one_less(self):
        self.awaited -= 1
        if not self.awaited and self.fd is not None:
            self._stop_reading()

    def _read_here(self):
        # TAKEN only: REFUSED, another thread reads (the broker, this very
        # moment, or a thread in call()) and our replies come from it; NESTED,
        # this thread reads already, inside a blocking call made on the loop.
        if self.conn.take_reading() is TakeResult.TAKEN:
            self.fd = self.direct.stdout.fileno()
            self.loop.add_reader(self.fd, self._readable)

    def _readable(self):
        direct = self.direct
        if not direct.read_once(self.conn, reading_buffer()) or direct.state is ReaderState.CLOSED:
            if self.fd is not None:  # (the replies it read may have stopped it already)
                self._stop_reading()

    def _stop_reading(self):
        fd, self.fd = self.fd, None
        self.loop.remove_reader(fd)
        self.conn.give_back_reading()


def _set(future, value, exc):
    if future.done():
        return  # cancelled, by a timeout say
    if exc is None:
        future.set_result(value)
    else:
        future.set_exception(exc)


_by_connection = weakref.WeakKeyDictionary()  # connection -> the LoopCalls of the loop that used it last


def loop_calls(conn):
    """The running loop's LoopCalls for ``conn`` (call from a coroutine)."""
    loop = asyncio.get_running_loop()
    calls = _by_connection.get(conn)
    if calls is None or calls.loop is not loop:
        # Another loop's stays alive while its futures wait; this one is used from now.
        calls = _by_connection[conn] = LoopCalls(loop, conn)
    return calls

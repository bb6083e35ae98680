"""Keepalive: notice a host or link that stopped answering.

One thread for every connection with a ``keepalive``: it pings those that
have been quiet for half their interval and declares lost those that stay
quiet for the whole interval despite the ping.  No thread at all while no
tunnel asks.  Any bytes from the host (a reply, a PONG, stderr) count as
life.
"""
import logging
import sys
import threading
import time
from typing import Optional, Set

if sys.version_info >= (3, 8):
    from typing import Protocol
else:  # a relay host's older Python
    Protocol = object

log = logging.getLogger('chopsticks')


class Watched(Protocol):
    """What the watch needs of a connection."""
    keepalive: Optional[float]  # seconds (never None while watched)
    last_rx: float    # time.monotonic() of the last bytes from the host
    last_ping: float  # ... and of the last PING sent
    closed: bool
    host: str

    def ping_nowait(self, now: float) -> bool:
        """Send a PING if that cannot block; whether it went out."""

    def declare_lost(self, reason: str) -> None:
        """End the connection (from another thread: this one must not block)."""


class KeepaliveWatch(object):
    """The keepalive thread, and the connections it watches."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.conns: Set[Watched] = set()
        self.thread: Optional[threading.Thread] = None

    def add(self, conn: Watched) -> None:
        with self.cond:
            self.conns.add(conn)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name='chopsticks-keepalive',
                                               daemon=True)
                self.thread.start()
            self.cond.notify()

    def remove(self, conn: Watched) -> None:
        with self.cond:
            self.conns.discard(conn)

    def _run(self):
        while True:
            with self.cond:
                if not self.conns:
                    self.thread = None
                    return
                tick = min(conn.keepalive or 1.0 for conn in self.conns) / 4.0
                self.cond.wait(min(max(tick, 0.05), 1.0))
                conns = list(self.conns)
            now = time.monotonic()
            for conn in conns:
                try:
                    self.check(conn, now)
                except Exception:
                    log.exception('chopsticks keepalive check failed')

    def check(self, conn: Watched, now: float) -> None:
        """Ping ``conn`` if it was quiet for half its keepalive interval;
        declare it lost if it stayed quiet for the whole interval despite
        the ping.  A ping is only sent when it cannot block: while a large
        write is stuck, ssh's own ServerAliveInterval, set from the same
        keepalive, watches the link."""
        interval = conn.keepalive or 0.0
        quiet = now - conn.last_rx
        if conn.closed or quiet < interval / 2.0:
            return
        if conn.last_ping <= conn.last_rx:
            conn.ping_nowait(now)
        elif quiet >= interval:
            self.remove(conn)
            conn.declare_lost('no reply to a keepalive ping within %gs '
                              '(the host or the link stopped responding)' % interval)


watch = KeepaliveWatch()

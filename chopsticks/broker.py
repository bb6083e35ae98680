"""One I/O thread for every tunnel in the process.

Reading from a thousand idle tunnels must not cost a thousand threads, so a
single daemon thread waits on all their pipes with ``selectors`` and hands
the bytes to each tunnel's callback.  Callers write from their own threads.
"""
import logging
import os
import selectors
import threading
import time

from . import wire

log = logging.getLogger(__name__)

# How long a pipe parked by a caller that read its own reply waits for the
# next call before the broker reads it again (see Broker.park).
PARK_TIME = 0.02


class Broker(object):
    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.thread = None
        self.pid = None
        self.flushes = []  # callables to run on the broker thread soon
        self.parked = {}  # fileobj -> (callback, when to register it): see park()
        self.held = set()  # transports whose stdout a caller keeps: see watch_held()
        self.next_held_look = 0.0
        self.sleeping = False  # in a select() that waits for an event, without a timeout
        self.last_park = 0.0
        # Callbacks read into this (they run one at a time, on the broker thread).
        self.read_buffer = wire.aligned_buffer(1 << 20)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def register(self, fileobj, callback):
        """Call ``callback()`` from the broker thread whenever ``fileobj`` is readable."""
        with self.lock:
            self.parked.pop(fileobj, None)
            try:
                self.selector.register(fileobj, selectors.EVENT_READ, callback)
            except KeyError:
                stale = self.selector.get_key(fileobj).fileobj
                if stale is fileobj:
                    return  # was parked, and registered when its time came
                # The fd number is ours now, so that file was closed while
                # registered: a bug, which must not leave this pipe unread.
                log.warning('chopsticks: %r was closed without being unregistered', stale)
                self.selector.unregister(stale)
                self.selector.register(fileobj, selectors.EVENT_READ, callback)
            self._ensure_thread()
        self._wake()

    def unregister(self, fileobj):
        with self.lock:
            if self.parked.pop(fileobj, None) is not None:
                return  # parked pipes are not registered yet (see _register_parked)
            try:
                self.selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass

    def park(self, fileobj, callback):
        """Register ``fileobj`` in PARK_TIME, unless it is registered or unregistered before.

        For a pipe given back by a caller that read its own reply: a caller
        making calls one after another takes it again within microseconds,
        and an unregister and register per call would cost a fifth of a
        round trip.  A pipe is parked only while no other reply is awaited,
        so all it may hold is a log record or EOF, read a little later.
        """
        with self.lock:
            self.last_park = now = time.monotonic()
            self.parked[fileobj] = (callback, now + PARK_TIME)
            wake, self.sleeping = self.sleeping, False
        if wake:
            self._wake()  # so its select() gets a timeout

    def watch_held(self, transport):
        """Call ``transport.release_if_idle()`` every PARK_TIME until it
        calls unwatch_held: for a pipe a caller keeps between its calls
        (ProcessTransport.hold_stdout), taken back once they stop."""
        with self.lock:
            self.held.add(transport)
            self._ensure_thread()
            wake, self.sleeping = self.sleeping, False
        if wake:
            self._wake()  # so its select() gets a timeout

    def unwatch_held(self, transport):
        with self.lock:
            self.held.discard(transport)

    def request_flush(self, flush):
        """Run ``flush()`` on the broker thread as soon as it can."""
        with self.lock:
            self.flushes.append(flush)
            self._ensure_thread()
        self._wake()

    def _wake(self):
        try:
            os.write(self._wake_w, b'.')
        except BlockingIOError:
            pass

    def _run_flushes(self):
        with self.lock:
            flushes, self.flushes = self.flushes, []
        for flush in flushes:
            try:
                flush()
            except Exception:
                log.exception('chopsticks broker flush failed')

    def _ensure_thread(self):
        # After a fork the child has the selector but not the thread.
        if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
            self.pid = os.getpid()
            self.thread = threading.Thread(target=self._run, name='chopsticks-broker', daemon=True)
            self.thread.start()

    def _register_parked(self):
        """Register the parked pipes whose time is up, and take back held ones
        that went idle; return the seconds to the next look."""
        now = time.monotonic()
        if self.held and now >= self.next_held_look:
            # Every PARK_TIME, not at every event: a holder calling all the
            # time must not lose its pipe to a busy broker's quick looks.
            # Outside self.lock: a transport's state_lock comes first (see
            # ProcessTransport.hold_stdout), and release_if_idle takes it.
            self.next_held_look = now + PARK_TIME
            for transport in list(self.held):
                transport.release_if_idle()
        with self.lock:
            now = time.monotonic()
            if self.held and not self.parked:
                return max(0.0, self.next_held_look - now)
            if not self.parked:
                # While a caller parks a pipe after every call, stay on a timer:
                # waking this thread from park() would cost what parking saves.
                if now - self.last_park < PARK_TIME:
                    return PARK_TIME
                self.sleeping = True
                return None
            due = [(f, callback) for f, (callback, when) in self.parked.items() if when <= now]
            for fileobj, callback in due:
                del self.parked[fileobj]
                try:
                    self.selector.register(fileobj, selectors.EVENT_READ, callback)
                except (KeyError, ValueError):
                    pass  # closed meanwhile
            if not self.parked:
                return PARK_TIME
            nearest = min(when for _, when in self.parked.values())
            if self.held:
                nearest = min(nearest, self.next_held_look)
            return max(0.0, nearest - now)

    def _run(self):
        select = self.selector.select
        while True:
            for key, _ in select(self._register_parked()):
                callback = key.data
                if callback is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self._run_flushes()
                    continue
                try:
                    callback()
                except Exception:
                    log.exception('chopsticks broker callback failed')


_broker = None
_broker_lock = threading.Lock()


def on_broker_thread():
    """Whether this is the broker's thread (a done-callback of a future whose
    reply the broker read runs there)."""
    broker = _broker
    return broker is not None and broker.thread is threading.current_thread()


def get_broker():
    global _broker
    if _broker is None:
        with _broker_lock:
            if _broker is None:
                raise_fd_limit()
                _broker = Broker()
    return _broker


def raise_fd_limit():
    """Each tunnel holds a few pipes: let a controller hold thousands."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass

"""Connects nobody waits for: ``call_async`` and ``acall`` on a tunnel not yet connected.

A caller of ``call_async`` asked for a future, not for a connect: it gets
the future at once, and the tunnel connects on a thread of its own.  Calls
made on that tunnel meanwhile queue behind the connect and go out in order
once it is done (the first right behind the agent, as ``call`` sends it).
A connect that fails fails each queued call's future with its
ConnectError, which names the host.

Connects started this way run under one process-wide
:class:`~chopsticks.dispatch.ConnectThrottle`, the policy ``Group`` applies
to its own connects: at most ``DEFAULT_MAX_CONNECT`` (16) at once, because
sshd drops unauthenticated connections past ``MaxStartups`` (10:30:100 by
default); a connect dropped at the handshake is retried after a jittered
backoff, and halves how many may run at once until connects succeed again.

This module runs on Python 3.6 too (a relay host may fan out from there).
"""
import _thread
import concurrent.futures
import threading
from typing import Any, Callable, Dict, List, Optional

from .dispatch import CONNECT_RETRIES, ConnectThrottle, dropped_at_handshake
from .errors import TunnelClosed

__all__ = ['BackgroundConnects', 'background_connects']


class PendingConnect(object):
    """One tunnel's connect in the background, and the calls waiting for it."""
    __slots__ = ('tunnel', 'calls', 'attempts', 'closed')

    def __init__(self, tunnel: Any) -> None:
        self.tunnel = tunnel
        self.calls: List[Any] = []  # (fn, args, kwargs, future), in the order they were made
        self.attempts = 0  # handshake drops so far (ConnectThrottle.dropped counts them)
        self.closed = False  # the tunnel was closed while this connect ran


class BackgroundConnects(object):
    """Connects tunnels on short-lived threads, at most as many at once as
    ``throttle`` lets; ``call_async`` is the way in."""

    def __init__(self, max_connect: int) -> None:
        self.lock = threading.Lock()
        self.throttle = ConnectThrottle(max_connect)
        self.pending: Dict[Any, PendingConnect] = {}  # tunnel -> its connect, queued or under way

    def call_async(self, tunnel: Any, fn: Callable[..., Any], args: tuple,
                   kwargs: dict) -> 'concurrent.futures.Future[Any]':
        """A ``concurrent.futures.Future`` of ``fn(*args, **kwargs)`` on
        ``tunnel``, which is connected in the background first."""
        future: 'concurrent.futures.Future[Any]' = concurrent.futures.Future()
        with self.lock:
            job = self.pending.get(tunnel)
            if job is None:
                job = self.pending[tunnel] = PendingConnect(tunnel)
                self.throttle.waiting.append(job)  # type: ignore[arg-type]  # a lane-like job
            job.calls.append((fn, args, kwargs, future))
            start = self._startable()
        self._start(start)
        return future

    def close(self, tunnel: Any) -> None:
        """``tunnel.close()`` while it connects here: a connect not started
        is dropped, one under way is closed when it is done; either way its
        queued calls fail with TunnelClosed."""
        with self.lock:
            job = self.pending.pop(tunnel, None)
            if job is None:
                return
            job.closed = True
            try:
                self.throttle.waiting.remove(job)  # type: ignore[arg-type]
            except ValueError:
                return  # under way: _connect sees job.closed
        _fail_closed(job)

    def connecting(self) -> int:
        """How many connects run now (for tests and diagnostics)."""
        return self.throttle.connecting

    # --- under lock
    def _startable(self):
        """The queued connects the throttle lets start now."""
        start = []
        job = self.throttle.next_lane()
        while job is not None:
            start.append(job)
            job = self.throttle.next_lane()
        return start

    # --- not under lock
    def _start(self, jobs):
        for job in jobs:
            # A thread per connect, gone once it is done: at most max_connect
            # exist, and none while nothing connects.  Not threading.Thread:
            # its start() waits until the new thread runs, up to 0.2 s each
            # for 16 new tunnels on a busy 2-core machine, and call_async
            # must not wait.  (Such a thread ends with the interpreter, as a
            # daemon thread does.)
            _thread.start_new_thread(self._connect, (job,))

    def _connect(self, job):
        tunnel = job.tunnel
        with self.lock:
            fn, args, kwargs, _ = job.calls[0]
        try:
            conn, sent = tunnel.open_connection((fn, args, kwargs))
        except BaseException as exc:
            self._failed(job, exc)
            return
        with self.lock:
            self.throttle.succeeded()
            closed = job.closed
            if not closed:
                del self.pending[tunnel]
            calls = job.calls
            start = self._startable()
        self._start(start)
        if closed:  # tunnel.close() came while this connect ran: it stays closed
            tunnel.close()
            _fail_closed(job)
            return
        for i, (fn, args, kwargs, future) in enumerate(calls):
            if i == 0 and sent is not None:
                _follow(sent, future)
                continue
            try:
                # On this connection: one lost meanwhile fails the call, as it
                # fails the calls in flight, rather than connecting again.
                _follow(conn.call_async(conn.pickle_call(fn, args, kwargs), fn), future)
            except BaseException as exc:  # cannot pickle it, or the tunnel closed meanwhile
                _settle(future, None, exc)

    def _failed(self, job, exc):
        with self.lock:
            if dropped_at_handshake(exc) and job.attempts < CONNECT_RETRIES:
                delay = self.throttle.dropped(job)
                retry = threading.Timer(delay, self._retry, args=(job,))
                retry.daemon = True
                retry.start()
                calls = ()
            else:
                self.throttle.failed()
                if not job.closed:
                    del self.pending[job.tunnel]
                calls = job.calls
            start = self._startable()
        self._start(start)
        for _, _, _, future in calls:
            _settle(future, None, exc)

    def _retry(self, job):
        with self.lock:
            if job.closed:
                return
            self.throttle.waiting.appendleft(job)
            start = self._startable()
        self._start(start)


def _fail_closed(job):
    for _, _, _, future in job.calls:
        _settle(future, None, TunnelClosed(
            '[%s] the tunnel was closed before it connected' % job.tunnel.host))


def _settle(future, value, exc):
    if not future.set_running_or_notify_cancel():
        return  # cancelled by its caller
    if exc is None:
        future.set_result(value)
    else:
        future.set_exception(exc)


def _follow(sent, future):
    """Settle ``future`` as the call's own future ``sent`` settles; cancelling
    ``future`` drops the reply."""
    def copy(done):
        if done.cancelled():
            future.cancel()
            return
        exc = done.exception()
        _settle(future, None if exc is not None else done.result(), exc)

    def cancel(outer):
        if outer.cancelled():
            sent.cancel()
    future.add_done_callback(cancel)
    sent.add_done_callback(copy)


_background: Optional[BackgroundConnects] = None
_background_lock = threading.Lock()


def background_connects() -> BackgroundConnects:
    """The process's BackgroundConnects, bounded as Group bounds connects."""
    global _background
    if _background is None:
        with _background_lock:
            if _background is None:
                from .group import DEFAULT_MAX_CONNECT
                _background = BackgroundConnects(DEFAULT_MAX_CONNECT)
    return _background

"""Queues: many different operations on many hosts, each host kept busy.

    queue = Queue()
    for name in ['a.txt', 'b.txt', 'c.txt']:
        queue.put(group, name, '/srv/' + name)
    queue.call(web1, restart).with_callback(print)
    queue.run()

A :class:`Queue` keeps one line of operations per tunnel: operations on one
tunnel run in the order they were queued, different tunnels run in parallel,
and a slow host does not hold the others back (unlike a sequence of Group
operations, which waits for every host at each step).  ``run()`` (or
``await queue.arun()``) runs until every queued operation, including those
queued by callbacks meanwhile, has finished.

Each operation returns an :class:`AsyncResult`.  An operation queued on a
:class:`~chopsticks.group.Group` gives a
:class:`~chopsticks.group.GroupResult` once every host of the group has
done it.
"""
import functools
from typing import Any, Callable, Dict, List, Optional

from .errors import ChopsticksError
from .group import (
    DEFAULT_MAX_CONNECT, DEFAULT_MAX_PARALLEL, ErrorResult, Group, GroupResult, is_tunnel,
    new_dispatcher,
)
from .operations import Operation, call_op, connect_op, fetch_op, fetch_paths, put_op

__all__ = ['Queue', 'AsyncResult', 'NotCompleted']

_PENDING = object()


class NotCompleted(ChopsticksError):
    """The operation of an AsyncResult has not finished: run the queue first."""


class AsyncResult(object):
    """The outcome of a queued operation, once the queue has run it.

    ``value`` is the operation's result; it raises :class:`NotCompleted`
    before the operation finished and, if it failed, the operation's
    exception (``RemoteException``, ``ConnectError``, ``CallTimeout``...).
    ``error`` is the :class:`~chopsticks.group.ErrorResult` of a failure,
    else None.  (An operation on a group never fails as a whole: its value
    is a GroupResult holding each host's ErrorResult.)
    """

    def __init__(self) -> None:
        self._value: Any = _PENDING
        self._error: Optional[ErrorResult] = None
        self._callbacks: List[Callable[[Any], Any]] = []

    @property
    def done(self) -> bool:
        return self._value is not _PENDING or self._error is not None

    @property
    def value(self) -> Any:
        if self._error is not None:
            raise self._error.exception
        if self._value is _PENDING:
            raise NotCompleted('the operation has not finished: call Queue.run() first')
        return self._value

    @property
    def error(self) -> Optional[ErrorResult]:
        return self._error

    def with_callback(self, callback: Callable[[Any], Any]) -> 'AsyncResult':
        """Call ``callback(value)`` when the operation finishes (with its
        ErrorResult if it failed), on the thread running the queue; returns
        self.  Callbacks may queue more operations.  An exception raised by a
        callback is raised by ``run()`` once the queue is empty.  If the
        operation has finished already, the callback is called now."""
        if self.done:
            callback(self._outcome())
        else:
            self._callbacks.append(callback)
        return self

    def _outcome(self) -> Any:
        return self._error if self._error is not None else self._value

    def _settle(self, value: Any, error: Optional[ErrorResult]) -> None:
        self._value, self._error = (_PENDING, error) if error is not None else (value, None)
        callbacks, self._callbacks = self._callbacks, []
        errors = []
        for callback in callbacks:
            try:
                callback(self._outcome())
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        if self._error is not None:
            return '<AsyncResult failed: %s>' % self._error
        if self._value is _PENDING:
            return '<AsyncResult pending>'
        return '<AsyncResult %r>' % (self._value,)


class Queue(object):
    """Operations queued per tunnel, run by ``run()``.

    ``target`` is a tunnel or a :class:`~chopsticks.group.Group`.  Tunnels
    connect when their first operation runs; at most ``max_parallel`` tunnels
    are busy and ``max_connect`` connecting at once (see
    :mod:`chopsticks.group`).  A tunnel that cannot connect fails all its
    operations in that run, at once.  ``timeout`` (seconds) bounds one
    operation on one host, from when it starts there.
    """

    def __init__(self, max_parallel: int = DEFAULT_MAX_PARALLEL, *,
                 max_connect: int = DEFAULT_MAX_CONNECT, progress: bool = True) -> None:
        self._dispatcher = new_dispatcher(max_parallel, max_connect, progress, {}, 'queue')

    def __len__(self) -> int:
        """Operations queued (per host) and not finished yet."""
        return self._dispatcher.pending

    def connect(self, target: Any) -> AsyncResult:
        """Connect the target; the value is its ``remote_info`` (a GroupResult of them for a group)."""
        return self._enqueue(target, connect_op(), None)

    def call(self, target: Any, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None,
             **kwargs: Any) -> AsyncResult:
        """Queue ``fn(*args, **kwargs)`` on the target (pickled once for all of a group's hosts)."""
        return self._enqueue(target, call_op(fn, args, kwargs), timeout)

    def put(self, target: Any, local_path: str, remote_path: Optional[str] = None,
            mode: int = 0o644, *, timeout: Optional[float] = None, **kwargs: Any) -> AsyncResult:
        """Queue a copy of a local file to the target (see ``Group.put``)."""
        return self._enqueue(target, put_op(local_path, remote_path, mode, kwargs), timeout)

    def fetch(self, target: Any, remote_path: str, local_path: Optional[str] = None, *,
              timeout: Optional[float] = None, **kwargs: Any) -> AsyncResult:
        """Queue a copy of a remote file from the target; for a group,
        ``local_path`` is a template with ``{host}`` (see ``Group.fetch``)."""
        if isinstance(target, Group):
            paths = fetch_paths(target.tunnels, remote_path, local_path)
        else:
            paths = {target: local_path}
        return self._enqueue(target, fetch_op(remote_path, paths, kwargs), timeout)

    def run(self) -> None:
        """Run every queued operation, and those queued meanwhile, then return."""
        try:
            self._dispatcher.run()
        finally:
            self._dispatcher.connect_failures.clear()

    async def arun(self) -> None:
        """``await queue.arun()``: ``run()`` without blocking the event loop."""
        try:
            await self._dispatcher.arun()
        finally:
            self._dispatcher.connect_failures.clear()

    def _enqueue(self, target: Any, op: Operation, timeout: Optional[float]) -> AsyncResult:
        result = AsyncResult()
        if isinstance(target, Group):
            self._enqueue_group(target, op, timeout, result)
        elif is_tunnel(target):
            def settle(value: Any, exc: Optional[BaseException], host: str = target.host) -> None:
                result._settle(value, None if exc is None else ErrorResult(host, exc))
            self._dispatcher.add(target, op, settle, timeout)
        else:
            raise TypeError('a Queue runs operations on a tunnel or a Group, not %r' % (target,))
        return result

    def _enqueue_group(self, group: Group, op: Operation, timeout: Optional[float],
                       result: AsyncResult) -> None:
        tunnels = list(group.tunnels)
        values: Dict[str, Any] = {}

        def settle(host: str, value: Any, exc: Optional[BaseException]) -> None:
            values[host] = value if exc is None else ErrorResult(host, exc)
            if len(values) == len(tunnels):
                result._settle(GroupResult((t.host, values[t.host]) for t in tunnels), None)

        if not tunnels:
            result._settle(GroupResult(), None)
        for tunnel in tunnels:
            self._dispatcher.add(tunnel, op, functools.partial(settle, tunnel.host), timeout)

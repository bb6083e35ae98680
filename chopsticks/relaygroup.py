"""One call per relay, each carrying the whole group of hosts behind it.

    from chopsticks import RelayedGroup

    fleet = RelayedGroup({'relay1': ['web%d' % i for i in range(250)],
                          'relay2': ['db%d' % i for i in range(250)]})
    loads = fleet.call(os.getloadavg)       # {'web0': (...), ..., 'db249': (...)}

``Group(hosts, via=relay)`` speaks the protocol end to end with every far
host: the relay only forwards bytes, and the controller still pays for one
call per host (about 46 µs of its CPU per host and round at 1,000 hosts,
bench/RESULTS.md).  A :class:`RelayedGroup` sends one call per relay
instead.  The relay keeps the connections to its own hosts (opened at the
first call, or by ``connect()``, and kept until ``close()``), sends them the
call exactly as the controller pickled it, once for all of them, and answers
with all their results in one reply.  Imports still come from the
controller, served through the relay (``chopsticks.relay``).

Results cross both hops in the safe codec: the relay cannot send the
controller anything but plain values, and a host's failure crosses as a
tagged tuple that the controller turns back into an :class:`ErrorResult`.
"""
import collections.abc
import functools
import os
import sys
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from . import errors
from .dispatch import GroupTunnel
from .group import (
    DEFAULT_MAX_CONNECT, DEFAULT_MAX_PARALLEL, ErrorResult, Group, GroupResult, is_tunnel,
    new_dispatcher,
)
from .hosts import tunnel_from_url
from .operations import Operation, Settle, settle_when_done
from .relay import relay_group_close, relay_group_run
from .serialize import describe, dumps_call

__all__ = ['RelayedGroup', 'RELAY_REPLY_MARGIN']

#: Seconds the controller waits for a relay beyond the call's ``timeout``:
#: the relay answers within ``timeout``, then encodes and sends a few
#: hundred results (a few ms here), on a machine that may be loaded.
RELAY_REPLY_MARGIN = 10.0

_GROUP_TIMEOUT: Any = object()   # "the group's own timeout"
_Spec = Tuple[Any, tuple, dict]  # how a relay builds a tunnel: BaseTunnel.relay_spec()


class RelayedGroup(object):
    """Hosts organised by relay: each operation is one call per relay.

    ``hosts_by_relay`` maps each relay (a tunnel or a host string) to its
    hosts (host strings as ``Group`` takes them, opened from the relay, or
    tunnels without a ``via`` of their own, rebuilt there).  A
    :class:`~chopsticks.group.Group` whose tunnels were opened ``via`` relays
    (``Group(hosts, via=relay)``, an inventory's group) works too.  Host names
    must be unique across all relays: results are keyed by them.

    ``timeout`` (seconds) bounds each operation as a whole on each relay,
    the far hosts' connects included: a host still connecting or running
    then holds a ``CallTimeout``.  A relay that does not answer within
    ``timeout`` + :data:`RELAY_REPLY_MARGIN` fails all its hosts.
    ``max_parallel`` and ``max_connect`` bound each relay's own fan-out.
    """

    def __init__(self, hosts_by_relay: Any, timeout: Optional[float] = None, *,
                 max_parallel: int = DEFAULT_MAX_PARALLEL, max_connect: int = DEFAULT_MAX_CONNECT,
                 progress: bool = True) -> None:
        if max_parallel < 1 or max_connect < 1:
            raise ValueError('max_parallel and max_connect must be at least 1')
        self.timeout = timeout
        self.max_parallel = max_parallel
        self.max_connect = max_connect
        self.progress = progress
        self._owned: List[GroupTunnel] = []  # relays made here from host strings: closed with us
        self._far: Dict[GroupTunnel, List[Tuple[str, _Spec]]] = {}
        self._keys: Dict[GroupTunnel, str] = {}
        self._set_up: Dict[GroupTunnel, bool] = {}  # the relay was sent the specs
        self._connect_errors: Dict[GroupTunnel, BaseException] = {}
        names: Dict[str, GroupTunnel] = {}
        for relay, far_hosts in _by_relay(hosts_by_relay):
            if isinstance(relay, str):
                relay = tunnel_from_url(relay)
                self._owned.append(relay)
            far = self._far.setdefault(relay, [])
            for host, spec in _far_specs(relay, far_hosts):
                if host in names:
                    raise ValueError('two hosts are named %r (behind %s and %s); results are keyed '
                                     'by host name' % (host, names[host].host, relay.host))
                names[host] = relay
                far.append((host, spec))
            self._keys[relay] = os.urandom(16).hex()

    @property
    def relays(self) -> List[GroupTunnel]:
        """The relay tunnels, in order."""
        return list(self._far)

    @property
    def hosts(self) -> List[str]:
        """The far hosts' names, relay by relay."""
        return [host for far in self._far.values() for host, _ in far]

    def hosts_of(self, relay: GroupTunnel) -> List[str]:
        """The names of the hosts behind ``relay``."""
        return [host for host, _ in self._far[relay]]

    def __len__(self) -> int:
        return sum(len(far) for far in self._far.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.hosts)

    def __contains__(self, host: Any) -> bool:
        return host in self.hosts

    def __repr__(self) -> str:
        return '%s({%s})' % (type(self).__name__, ', '.join(
            '%r: %d hosts' % (relay.host, len(far)) for relay, far in self._far.items()))

    # --- operations
    def connect(self) -> GroupResult:
        """Connect every far host (trying again those that failed before);
        ``{host: remote_info or ErrorResult}``.  Unbounded by ``timeout``:
        each far connect has its tunnel's own ``connect_timeout``."""
        self._connect_errors.clear()
        return self._fan_out(None, '', None)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: Any = _GROUP_TIMEOUT,
             **kwargs: Any) -> GroupResult:
        """Run ``fn(*args, **kwargs)`` on every far host:
        ``{host: value or ErrorResult}``; one call per relay.

        The call is pickled once, here, and each relay passes the same bytes
        to its hosts.  ``timeout`` overrides the group's (see the class).
        """
        if timeout is _GROUP_TIMEOUT:
            timeout = self.timeout
        return self._fan_out(_pickle_for_all(fn, args, kwargs), describe(fn), timeout)

    def run(self, command: Any, **kwargs: Any) -> GroupResult:
        """A shell command on every far host: a GroupResult of CommandResult;
        see ``chopsticks.shell.run_group`` (its ``timeout`` is the command's)."""
        from .shell import run_group
        return run_group(self, command, **kwargs)

    def close(self) -> None:
        """Close the far hosts' connections on every relay that is connected
        (their agents exit), and the relays given as host strings."""
        self._connect_errors.clear()
        for relay, key in self._keys.items():
            self._set_up[relay] = False
            if getattr(relay, 'connected', False):
                try:
                    relay.call_async(relay_group_close, key).result(RELAY_REPLY_MARGIN)
                except Exception:
                    pass  # a relay gone takes its far connections with it
        for relay in self._owned:
            relay.close()

    def __enter__(self) -> 'RelayedGroup':
        self.connect()  # as Group does: failures are in the first call's results
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # --- one call per relay
    def _fan_out(self, payload: Optional[bytes], what: str, timeout: Optional[float]) -> GroupResult:
        """``payload`` (the call pickled, ``what`` its function's name; None:
        connect) on every far host, one call per relay."""
        replies = self._ask_relays(list(self._far), payload, what, timeout)
        lost = [relay for relay, (value, exc) in replies.items() if exc is None and value == ('unknown',)]
        if lost:  # their agents restarted since they were set up: set them up again
            for relay in lost:
                self._set_up[relay] = False
            replies.update(self._ask_relays(lost, payload, what, timeout))
        results = GroupResult()
        for relay, far in self._far.items():
            value, exc = replies[relay]
            if exc is not None:
                for host, _ in far:
                    results[host] = ErrorResult(host, _through(host, relay, exc))
                continue
            values, failures = _relay_outcomes(relay, value, len(far))
            for index, (host, _) in enumerate(far):
                if index in failures:
                    results[host] = _outcome(host, relay, failures[index])
                elif index < len(values):
                    results[host] = values[index]
                else:
                    results[host] = _outcome(host, relay, _MISSING)
        return results

    def _ask_relays(self, relays: List[GroupTunnel], payload: Optional[bytes], what: str,
                    timeout: Optional[float]) -> Dict[GroupTunnel, Tuple[Any, Optional[BaseException]]]:
        """One call to each of ``relays``: ``{relay: (reply, exc)}``."""
        replies: Dict[GroupTunnel, Tuple[Any, Optional[BaseException]]] = {}

        def work(relay: GroupTunnel, conn: Any, settle: Settle) -> Any:
            setup = None if self._set_up.get(relay) else self._setup(relay)
            sent = relay.call_async(relay_group_run, self._keys[relay], setup, payload, what, timeout)
            return settle_when_done(sent, functools.partial(self._answered, relay, setup, settle))

        label = 'call ' + what if payload is not None else 'connect'
        op = Operation('%s through %d relays' % (label, len(relays)), work, False)
        dispatcher = new_dispatcher(self.max_parallel, self.max_connect, self.progress,
                                    self._connect_errors, op.what)
        dispatcher.add_each([(relay, functools.partial(_keep, replies, relay)) for relay in relays],
                            op, None if timeout is None else timeout + RELAY_REPLY_MARGIN)
        dispatcher.run()
        return replies

    def _answered(self, relay: GroupTunnel, setup: Any, settle: Settle, value: Any,
                  exc: Optional[BaseException]) -> None:
        if exc is None and setup is not None and value != ('unknown',):
            self._set_up[relay] = True  # later calls go without the specs
        settle(value, exc)

    def _setup(self, relay: GroupTunnel) -> Tuple[List[_Spec], int, int]:
        return [spec for _, spec in self._far[relay]], self.max_parallel, self.max_connect


# --- building ---------------------------------------------------------------------------

def _by_relay(hosts_by_relay: Any) -> Iterable[Tuple[Any, Iterable[Any]]]:
    """``(relay, far hosts)`` pairs from a mapping, or from tunnels opened ``via`` relays."""
    if isinstance(hosts_by_relay, collections.abc.Mapping):
        return [(relay, [hosts] if isinstance(hosts, str) or is_tunnel(hosts) else hosts)
                for relay, hosts in hosts_by_relay.items()]
    tunnels = hosts_by_relay.tunnels if isinstance(hosts_by_relay, Group) else list(hosts_by_relay)
    grouped: Dict[Any, List[Any]] = {}
    for tunnel in tunnels:
        via = getattr(tunnel, 'via', None)
        if via is None:
            raise ValueError('%r has no relay: give RelayedGroup {relay: [hosts]}, or tunnels '
                             'opened via a relay' % (tunnel,))
        grouped.setdefault(via, []).append(tunnel)
    return list(grouped.items())


def _far_specs(relay: GroupTunnel, far_hosts: Iterable[Any]) -> Iterator[Tuple[str, _Spec]]:
    for item in far_hosts:
        if isinstance(item, str):
            item = tunnel_from_url(item)
        elif not is_tunnel(item) or not hasattr(item, 'relay_spec'):
            raise TypeError('the hosts behind a relay are host strings and tunnels, not %r' % (item,))
        elif getattr(item, 'via', None) not in (None, relay):
            raise ValueError('%r is opened via %r, not via the relay %r it is listed under'
                             % (item, item.via, relay.host))
        yield item.host, item.relay_spec()


def _pickle_for_all(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    """The call pickled for far hosts of any Python version or, for a
    function without source, of the controller's."""
    try:
        return dumps_call(fn, args, kwargs)
    except Exception as error:
        first_error = error
    try:
        return dumps_call(fn, args, kwargs, tuple(sys.version_info[:2]))
    except Exception:
        raise first_error from None


def _keep(replies: Dict[Any, Any], relay: Any, value: Any, exc: Optional[BaseException]) -> None:
    replies[relay] = (value, exc)


# --- reading what a relay sent: plain values only, checked ------------------------------

_MISSING = ('missing',)

# The errors a relay may name; anything else becomes a ChopsticksError.
_NAMED_ERRORS = {cls.__name__: cls for cls in (
    errors.ChopsticksError, errors.CallTimeout, errors.TunnelClosed, errors.ProtocolError,
    errors.DepthLimitExceeded,
)}


def _relay_outcomes(relay: GroupTunnel, reply: Any, count: int) -> Tuple[list, dict]:
    """The relay's ``(values, {index: failure})`` for its ``count`` hosts
    (see relay_group_run); a relay that failed as a whole fails each host."""
    if (isinstance(reply, tuple) and len(reply) == 3 and reply[0] == 'ok'
            and isinstance(reply[1], list) and isinstance(reply[2], dict)):
        return reply[1], reply[2]
    failed = ('relay', _relay_failure(relay, reply))
    return [], dict.fromkeys(range(count), failed)


def _relay_failure(relay: GroupTunnel, reply: Any) -> BaseException:
    """What a relay's own failure (relay_group_run's _failure tuple) was."""
    try:
        kind = reply[0]
        if kind == 'remote':
            return errors.RemoteException(relay.host, str(reply[2]), str(reply[3]), str(reply[4] or ''))
        if kind == 'connect':
            return errors.ConnectError(relay.host, str(reply[1]), str(reply[2] or ''))
        if kind == 'error':
            return errors.ChopsticksError('[%s] %s: %s' % (relay.host, reply[1], reply[2]))
    except (TypeError, IndexError, KeyError):
        pass
    return errors.ProtocolError('[%s] sent a malformed reply for its group: %.200r' % (relay.host, reply))


def _outcome(host: str, relay: GroupTunnel, outcome: Any) -> ErrorResult:
    """A far host's ErrorResult, from the failure its relay sent."""
    try:
        kind = outcome[0]
        if kind == 'relay':
            return ErrorResult(host, _through(host, relay, outcome[1]))
        if kind == 'remote':
            return ErrorResult(host, errors.RemoteException(host, str(outcome[2]), str(outcome[3]),
                                                            str(outcome[4] or '')))
        if kind == 'connect':
            return ErrorResult(host, errors.ConnectError(
                host, 'via %s: %s' % (relay.host, outcome[1]), str(outcome[2] or '')))
        if kind == 'error':
            cls = _NAMED_ERRORS.get(outcome[1], errors.ChopsticksError)
            text = str(outcome[2])
            if cls is errors.ChopsticksError and outcome[1] != 'ChopsticksError':
                text = 'via %s: %s: %s' % (relay.host, outcome[1], text)
            if not text.startswith('[%s] ' % host):
                text = '[%s] %s' % (host, text)
            return ErrorResult(host, cls(text))
        if kind == 'missing':
            return ErrorResult(host, errors.ProtocolError(
                '[%s] the relay %s sent no result for this host' % (host, relay.host)))
    except (TypeError, IndexError, KeyError):
        pass
    return ErrorResult(host, errors.ProtocolError(
        '[%s] the relay %s sent a malformed result for this host: %.200r' % (host, relay.host, outcome)))


def _through(host: str, relay: GroupTunnel, exc: BaseException) -> errors.ChopsticksError:
    """A far host's error when its relay failed: names the relay and why."""
    error = errors.ChopsticksError('[%s] through the relay %s: %s'
                                   % (host, relay.host, ErrorResult(relay.host, exc).msg))
    error.__cause__ = exc
    return error

"""Tunnels through tunnels.

``Tunnel('web1', via=bastion)`` builds the tunnel on the host ``bastion``:
bastion's agent opens (with its own ssh_config and keys) the connection to
``web1``, and calls to ``web1`` travel controller -> bastion -> web1 as
pre-pickled payloads that bastion forwards without unpickling.  Replies are
decoded and re-encoded on the relay with the same safe codec.  Imports for
``web1`` are served by bastion, which forwards them to the controller and
caches them, so a hundred hosts behind one relay cost the controller one
connection and one copy of each module.

A depth limit stops tunnels opened by tunnels from nesting without bound.

This module runs on both sides: the controller uses ``RelayConnection``; the
relay host runs the ``relay_*`` functions (served to it by the import hook),
which is why everything else is imported lazily.
"""
import concurrent.futures
import os
import sys
import threading

DEFAULT_MAX_DEPTH = 3


# --- on the relay host ----------------------------------------------------------

_tunnels = {}  # type: dict
_tunnels_lock = threading.Lock()


def _relayed_tunnel(key, spec):
    with _tunnels_lock:
        tunnel = _tunnels.get(key)
        if tunnel is None:
            cls, args, kwargs = spec
            tunnel = _tunnels[key] = cls(*args, **kwargs)
    return tunnel


def _failure(exc):
    """An exception as a codec-friendly value, to re-raise on the controller."""
    from .errors import ConnectError, RemoteException
    if isinstance(exc, RemoteException):
        return ('remote', exc.host, exc.type_name, exc.msg, exc.remote_traceback)
    if isinstance(exc, ConnectError):
        return ('connect', exc.reason, exc.stderr)
    return ('error', type(exc).__name__, str(exc))


def _waiting_on_another_host():
    """Let the relay's agent read our frames while this call waits (see Agent.hand_off_reading)."""
    agent_module = sys.modules.get('_chopsticks_agent')
    if agent_module is not None and agent_module.agent is not None:
        agent_module.agent.hand_off_reading()


def relay_connect(key, spec):
    _waiting_on_another_host()
    try:
        return ('ok', dict(_relayed_tunnel(key, spec).remote_info))
    except Exception as e:
        return _failure(e)


def relay_call(key, spec, payload, what, timeout):
    _waiting_on_another_host()
    try:
        conn = _relayed_tunnel(key, spec).connection()
        return ('ok', conn.wait(conn.call_async(payload, what), timeout, what))
    except Exception as e:
        return _failure(e)


def relay_iter(key, spec, payload, what, timeout):
    try:
        conn = _relayed_tunnel(key, spec).connection()
        for item in conn.call_iter(payload, what, timeout):
            yield ('ok', item)
    except Exception as e:
        yield _failure(e)


def relay_stream(stream, key, spec, payload, what, timeout):
    try:
        conn = _relayed_tunnel(key, spec).connection()
        return ('ok', conn.call_stream(payload, stream, what, timeout))
    except Exception as e:
        return _failure(e)


def relay_close(key):
    with _tunnels_lock:
        tunnel = _tunnels.pop(key, None)
    if tunnel is not None:
        tunnel.close()


def current_depth():
    """How many hops from the controller this process is (0 on the controller)."""
    import sys
    agent_module = sys.modules.get('_chopsticks_agent')
    agent = getattr(agent_module, 'agent', None)
    if agent is None:
        return 0
    return agent.config.get('depth', 1)


def max_depth():
    import sys
    agent = getattr(sys.modules.get('_chopsticks_agent'), 'agent', None)
    if agent is None:
        return DEFAULT_MAX_DEPTH
    return agent.config.get('max_depth', DEFAULT_MAX_DEPTH)


# --- on the controller -------------------------------------------------------------

class RelayConnection(object):
    """Stands in for a Connection (it is a ``chopsticks.connection.CallChannel``):
    every operation is a call on the relay tunnel."""

    def __init__(self, tunnel, via):
        self.tunnel = tunnel
        self.via = via
        self.host = tunnel.host
        self.key = os.urandom(16).hex()  # not uuid: importing it costs 10 ms (platform, ctypes)
        self.spec = tunnel.relay_spec()
        self.remote = None
        self.closed = False

    def _unwrap(self, reply):
        from . import errors
        kind = reply[0]
        if kind == 'ok':
            return reply[1]
        if kind == 'remote':
            _, host, type_name, msg, tb = reply
            raise errors.RemoteException(host, type_name, msg, tb)
        if kind == 'connect':
            _, reason, stderr = reply
            raise errors.ConnectError(self.host, 'via %s: %s' % (self.via.host, reason), stderr)
        _, name, msg = reply
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, errors.ChopsticksError):
            raise cls(msg)
        raise errors.ChopsticksError('[%s] via %s: %s: %s' % (self.host, self.via.host, name, msg))

    def start(self, timeout):
        self.remote = self._unwrap(self.via.call(relay_connect, self.key, self.spec,
                                                 timeout=timeout))

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.via.connected:
            try:
                self.via.call_async(relay_close, self.key)
            except Exception:
                pass

    def pickle_call(self, fn, args, kwargs):
        from .serialize import dumps_call
        return dumps_call(fn, args, kwargs, self.remote and self.remote.get('version'))

    def send_modules_for(self, fn):
        """Nothing: the relay serves the far host's imports (ForwardingModuleServer)."""

    def take_reading(self):
        """Never: the replies come through the via tunnel."""
        from .transport import TakeResult
        return TakeResult.REFUSED

    def call_async(self, payload, what, timeout=None):
        from .replies import name_of
        outer = concurrent.futures.Future()
        inner = self.via.call_async(relay_call, self.key, self.spec, payload, name_of(what),
                                    timeout)

        def settle(done):
            try:
                outer.set_result(self._unwrap(done.result()))
            except BaseException as e:
                outer.set_exception(e)
        inner.add_done_callback(settle)
        return outer

    def call_then(self, payload, what, callback):
        """``call_async``, its outcome handed to ``callback(value, exc)``."""
        future = self.call_async(payload, what)

        def settle(done):
            try:
                value = done.result()
            except BaseException as e:
                callback(None, e)
            else:
                callback(value, None)
        future.add_done_callback(settle)
        return future

    def wait(self, future, timeout, what):
        from .errors import CallTimeout
        from .replies import name_of
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise CallTimeout('[%s] %s did not finish within %ss' % (self.host, name_of(what), timeout))

    def call(self, payload, what, timeout=None):
        return self.wait(self.call_async(payload, what, timeout), timeout, what)

    def call_iter(self, payload, what, timeout=None):
        from .replies import name_of
        for reply in self.via.call_iter(relay_iter, self.key, self.spec, payload, name_of(what),
                                        timeout):
            yield self._unwrap(reply)

    def call_stream(self, payload, chunks, what, timeout=None):
        from .replies import name_of
        return self._unwrap(self.via.call_stream(relay_stream, chunks, self.key, self.spec,
                                                 payload, name_of(what), timeout))

    def wide_pipe(self, direction):
        """The data runs through the via tunnel's pipes: widen those."""
        return self.via.connection().wide_pipe(direction)


# --- on the relay host: one call carrying a whole group (chopsticks.relaygroup) ----------

_far_groups = {}  # type: dict  # key -> _FarGroup, kept between calls


class _FarGroup(object):
    """A relay's far hosts for one RelayedGroup: tunnels, and those whose
    connect failed (not tried again until a connect, as in a Group)."""

    def __init__(self, specs, max_parallel, max_connect):
        self.tunnels = [cls(*args, **kwargs) for cls, args, kwargs in specs]
        self.max_parallel = max_parallel
        self.max_connect = max_connect
        self.connect_failures = {}  # type: dict

    def close(self):
        self.connect_failures.clear()
        for tunnel in self.tunnels:
            tunnel.close()


def _far_group(key, setup):
    """The far group ``key`` names, built from ``setup`` (specs, max_parallel,
    max_connect) when new; None when this relay does not know it and no
    setup came (the controller sends it with a first call only)."""
    with _tunnels_lock:
        group = _far_groups.get(key)
        if group is None and setup is not None:
            group = _far_groups[key] = _FarGroup(*setup)
    return group


def _payload_op(payload, what):
    """A call already pickled on the controller, sent to each far host as it
    is: the relay never unpickles the function or its arguments."""
    from .errors import TunnelClosed
    from .operations import Operation

    def work(tunnel, conn, settle):
        if conn is None:  # a far host that is itself behind another relay
            conn = tunnel.connection()
        if conn.closed:
            raise TunnelClosed('[%s] connection lost before %s was sent' % (tunnel.host, what))
        return conn.call_then(payload, what, settle)

    return Operation('call ' + what, work, False)


def relay_group_run(key, setup, payload, what, timeout):
    """Call ``payload`` (None: connect) on every far host of the group ``key``;
    ``('ok', values, failures)``: the hosts' values in the order of their
    specs and ``{index: _failure tuple}`` for those that failed (no names, no
    wrapper per host: a quarter of the controller's decoding at 250 hosts);
    ``('unknown',)`` when the group must be set up again, or a _failure of
    the whole relay.

    With a ``timeout`` the reply leaves within it, connects included: a far
    host still connecting or running then is reported as timed out and its
    job abandoned (a call not started by then is never sent)."""
    _waiting_on_another_host()
    try:
        group = _far_group(key, setup)
        if group is None:
            return ('unknown',)
        return ('ok',) + _run_far(group, payload, what, timeout)
    except Exception as e:
        return _failure(e)


def _run_far(group, payload, what, timeout):
    import functools
    from .errors import CallTimeout
    from .dispatch import Dispatcher
    from .operations import connect_op
    if payload is None:
        op = connect_op()
        group.connect_failures.clear()  # a connect tries again, as Group.connect does
    else:
        op = _payload_op(payload, what)
    dispatcher = Dispatcher(group.max_parallel, group.max_connect, False, group.connect_failures,
                            op.what)
    settled = {}

    def store(index, value, exc):
        settled[index] = (value, exc)

    dispatcher.add_each([(t, functools.partial(store, i)) for i, t in enumerate(group.tunnels)], op)
    if timeout is None:
        dispatcher.run()
    else:
        crashed = []

        def drive():
            try:
                dispatcher.run()
            except BaseException as e:
                crashed.append(e)
        runner = threading.Thread(target=drive, name='chopsticks-relay-group', daemon=True)
        runner.start()
        runner.join(timeout)
        if runner.is_alive():
            dispatcher.stop()  # under its lock: nothing settles after this
            runner.join(5.0)
        if crashed:
            raise crashed[0]
    done = dict(settled)  # a copy: a stopped run settles nothing more, but to be sure
    values = [None] * len(group.tunnels)
    failures = {}
    for index, tunnel in enumerate(group.tunnels):
        value, exc = done.get(index, (None, _timed_out))
        if exc is _timed_out:
            if payload is None or not tunnel.connected:
                text = '[%s] did not connect%s within %ss' % (
                    tunnel.host, '' if payload is None else ' and finish ' + op.what, timeout)
            else:
                text = '[%s] %s did not finish within %ss' % (tunnel.host, op.what, timeout)
            exc = CallTimeout(text)
        if exc is None:
            values[index] = value
        else:
            failures[index] = _failure(exc)
    return values, failures


_timed_out = object()


def relay_group_close(key):
    """Close the far group ``key``'s connections (its agents exit)."""
    with _tunnels_lock:
        group = _far_groups.pop(key, None)
    if group is not None:
        group.close()

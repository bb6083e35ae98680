"""Tunnels: what a user holds.  One tunnel, one host, one running agent.

Connection is lazy (the first call connects), explicit with ``connect()``,
and automatic again after the connection was closed or lost.
"""
import asyncio
import functools
import os
import re
import shlex
import sys
import threading

from . import bootstrap, cache
from .aio import loop_inbox
from .become import BecomeTunnel
from .connection import Connection
from .errors import CallTimeout, DepthLimitExceeded, TunnelClosed
from .modserver import MAGIC
from .serialize import describe, dumps_call
from .transport import ProcessTransport

__all__ = ['BaseTunnel', 'SubprocessTunnel', 'Local', 'Sudo', 'Su', 'Doas', 'Docker', 'SSHTunnel',
           'Tunnel']

DEFAULT_CONNECT_TIMEOUT = 30.0
_OUR_VERSION = list(sys.version_info[:2])  # as an agent's hello and chopsticks.cache give it


class BaseTunnel(object):
    """A host that can run Python functions.

    Subclasses say how to start the agent (``transport()``); everything else,
    calls, streaming, reconnection, lives here.
    """

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        # How to build this tunnel again on a relay host (see relay_spec).
        self._spec = (cls, args, {k: v for k, v in kwargs.items() if k != 'via'})
        return self

    def __init__(self, host, python=None, connect_timeout=DEFAULT_CONNECT_TIMEOUT, via=None,
                 keepalive=None):
        self.host = host
        self.python = python
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        if isinstance(via, str):  # Sudo('root', via='web1'), as a host string would say it
            from .hosts import tunnel_from_url
            via = tunnel_from_url(via)
        self.via = via
        self._conn = None
        self._lock = threading.Lock()

    def __repr__(self):
        if self.via is not None:
            return '%s(%r, via=%r)' % (type(self).__name__, self.host, self.via)
        return '%s(%r)' % (type(self).__name__, self.host)

    def relay_spec(self):
        """(class, args, kwargs) that rebuild this tunnel on a relay host."""
        return self._spec

    # --- subclass interface
    def transport(self):
        """A new transport that starts the agent on this host."""
        raise NotImplementedError

    def settings(self):
        """Settings sent to the agent as it starts."""
        from .relay import current_depth, max_depth
        depth = current_depth() + 1
        if depth > max_depth():
            raise DepthLimitExceeded(
                '[%s] cannot open a tunnel %d hops from the controller (the limit is %d)'
                % (self.host, depth, max_depth()))
        return {'host': self.host, 'depth': depth, 'max_depth': max_depth(),
                'compiled_agent': self.compiled_agent}

    compiled_agent = False  # this connect sends the agent compiled (see _ship_compiled_agent)

    # Interpreters, as _version_key() names them, whose agent reported our
    # Python version: learned in _connected, and kept between runs in
    # chopsticks.cache under _version_fact().
    _same_version = {}  # type: dict

    def _version_key(self):
        """What names the interpreter this tunnel starts, for _same_version;
        None: the agent always travels as source."""
        return None

    def _ship_compiled_agent(self):
        """Whether to send the agent compiled by this interpreter as well as
        its source: for interpreters known to run our Python version, which
        then skip compiling it (~16 ms) at the price of a payload 4x larger."""
        key = self._version_key()
        if key is None:
            return False
        same = self._same_version.get(key)
        if same is None:  # not yet asked in this process: perhaps in an earlier run
            same = self._same_version[key] = cache.fact(*self._version_fact(key)) == _OUR_VERSION
        return same

    def _version_fact(self, key):
        """(section, key) of the interpreter's Python version in chopsticks.cache."""
        return 'python', [type(self).__name__, key]

    # --- connection
    def connect(self):
        """Start the agent now (calls do it on first use)."""
        self.connection()
        return self

    def connection(self):
        """The running :class:`~chopsticks.connection.Connection`, connecting first if needed."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        return self.open_connection()[0]

    def open_connection(self, first_call=None):
        """Connect, unless another thread just did; returns the connection
        and, if ``first_call`` ``(fn, args, kwargs)`` was sent with the
        connect, its CallFuture (else None).

        The first call goes right behind the agent, before the agent's HELLO
        comes back: one round trip less (50 ms on a WAN).  Not when it can
        only be pickled for a known Python version (a function without
        source), nor through a relay.
        """
        with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn, None
            first = None
            if self.via is not None:
                from .relay import RelayConnection
                conn = RelayConnection(self, self.via)
                conn.start(self.connect_timeout)
            else:
                # Decided once: the command line (the stub's length) and
                # the payload sent must agree.
                self.compiled_agent = self._ship_compiled_agent()
                conn = Connection(self.host, self.transport(), self.settings(),
                                  keepalive=self.keepalive)
                if self.compiled_agent:  # the remote runs our Python version
                    conn.modules.remote_magic = MAGIC  # modules may go ahead compiled
                payload = self._pickle_first_call(first_call, self.compiled_agent)
                conn.launch()
                if payload is not None:
                    fn = first_call[0]
                    try:
                        conn.send_modules_for(fn)
                        first = conn.call_async(payload, fn)
                    except TunnelClosed:
                        pass  # the process is gone already: wait_started says why
                conn.wait_started(self.connect_timeout)
            self._conn = conn
            if conn.remote:
                self._connected(conn)
            return conn, first

    @staticmethod
    def _pickle_first_call(first_call, same_version):
        """``first_call`` pickled to go out before the agent says which
        Python it runs (``same_version``: ours, known from an earlier
        connect), or None."""
        if first_call is None:
            return None
        version = tuple(sys.version_info[:2]) if same_version else None
        try:
            return dumps_call(*first_call, remote_version=version)
        except Exception:
            return None  # pickled again once connected, and its error reported then

    @property
    def connected(self):
        return self._conn is not None and not self._conn.closed

    @property
    def direct_connection(self):
        """The Connection this tunnel opened itself (maybe closed since), or
        None: before the first connect, and for a tunnel opened through a
        relay.  Never connects.  chopsticks.dispatch sends one pickled call
        to many hosts through it (``call_then``)."""
        return self._conn if self.via is None else None

    @property
    def remote_info(self):
        """What the agent reported on start: pid, python, version, platform, hostname."""
        return dict(self.connection().remote)

    def close(self):
        """Stop the agent.  The tunnel reconnects if used again."""
        connecting = sys.modules.get('chopsticks.connecting')  # loaded once call_async connects
        if connecting is not None:
            connecting.background_connects().close(self)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        conn = getattr(self, '_conn', None)
        if conn is not None and not conn.closed:
            try:
                if sys.is_finalizing() and hasattr(conn, 'abandon'):
                    # At interpreter exit the other threads stop where they
                    # stand, maybe holding a lock that closing takes (the
                    # broker's, a paramiko channel's): end the transport
                    # without taking any.  (A relayed tunnel ends with its relay.)
                    conn.abandon()
                else:
                    conn.close()
            except Exception:
                pass

    # --- set operations: a tunnel acts as a group of one (see chopsticks.group)
    def _group_op(self, name, other):
        from .group import Group
        return getattr(Group([self]), name)(other)

    def __or__(self, other):
        return self._group_op('__or__', other)

    def __add__(self, other):
        return self._group_op('__add__', other)

    def __and__(self, other):
        return self._group_op('__and__', other)

    def __sub__(self, other):
        return self._group_op('__sub__', other)

    def __xor__(self, other):
        return self._group_op('__xor__', other)

    def _connected(self, conn):
        """Called once a new connection's agent said hello (``conn.remote``)."""
        key = self._version_key()
        if key is not None:
            version = list(conn.remote.get('version', ()))[:2]
            self._same_version[key] = version == _OUR_VERSION
            cache.learn(*self._version_fact(key), version)

    # --- calling
    def call(self, fn, *args, timeout=None, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the host and return its value.

        Raises RemoteException if it raised there, CallTimeout after
        ``timeout`` seconds, TunnelClosed if the connection was lost.  (To pass
        the function a keyword argument called ``timeout`` or ``fn``, wrap it
        in ``functools.partial``.)
        """
        conn = self._conn
        if conn is None or conn.closed:
            conn, first = self.open_connection((fn, args, kwargs))
            if first is not None:
                return conn.wait(first, timeout, describe(fn))
        return conn.call(conn.pickle_call(fn, args, kwargs), fn, timeout)

    def call_async(self, fn, *args, **kwargs):
        """Start ``fn(*args, **kwargs)`` on the host; returns a
        ``concurrent.futures.Future`` at once.  Many may be in flight at once.
        A tunnel not connected yet connects in the background (see
        chopsticks.connecting); a connect error comes through the future."""
        conn = self._conn
        if conn is None or conn.closed:
            from .connecting import background_connects
            return background_connects().call_async(self, fn, args, kwargs)
        return conn.call_async(conn.pickle_call(fn, args, kwargs), fn)

    def call_iter(self, fn, *args, timeout=None, **kwargs):
        """Iterate on the controller over what ``fn(*args, **kwargs)`` yields on the
        host, as it is produced.  The remote runs at most a small window ahead
        of the consumer.  ``timeout`` bounds the wait for each item."""
        conn = self.connection()
        return conn.call_iter(conn.pickle_call(fn, args, kwargs), describe(fn), timeout)

    def call_stream(self, fn, chunks, *args, timeout=None, **kwargs):
        """Run ``fn(stream, *args, **kwargs)`` on the host, where ``stream``
        iterates over the bytes objects of ``chunks`` sent from here with flow
        control.  Returns ``fn``'s value."""
        conn = self.connection()
        return conn.call_stream(conn.pickle_call(fn, args, kwargs), chunks, describe(fn), timeout)

    # --- shell commands (chopsticks.shell does the work)
    def run(self, command, **kwargs):
        """Run a shell command on the host: a :class:`~chopsticks.shell.CommandResult`,
        or :class:`~chopsticks.errors.CommandFailed`; see ``chopsticks.shell.run``."""
        from .shell import run
        return run(self, command, **kwargs)

    # --- files (chopsticks.files does the work)
    def put(self, local_path, remote_path=None, mode=0o644, **kwargs):
        """Copy a local file (or directory tree) to the host; see ``chopsticks.files.put``."""
        from .files import put
        return put(self, local_path, remote_path, mode=mode, **kwargs)

    def fetch(self, remote_path, local_path=None, **kwargs):
        """Copy a file (or directory tree) from the host; see ``chopsticks.files.fetch``."""
        from .files import fetch
        return fetch(self, remote_path, local_path, **kwargs)

    def sync(self, local_dir, remote_dir, **kwargs):
        """Make ``remote_dir`` match ``local_dir``, sending only changed files."""
        from .files import sync
        return sync(self, local_dir, remote_dir, **kwargs)

    # --- asyncio: the same operations, awaitable from a running event loop
    async def aconnect(self):
        if not self.connected:
            await asyncio.get_running_loop().run_in_executor(None, self.connect)
        return self

    def acall(self, fn, *args, timeout=None, **kwargs):
        """``await tunnel.acall(fn, ...)``: like ``call`` without blocking the
        loop.  Returns an awaitable that asyncio takes as a coroutine too
        (``create_task``, ``gather``, ``asyncio.run``).  On a connected
        tunnel, from a running loop, the call goes out at once (see
        chopsticks.aio); a tunnel not connected yet connects in the background."""
        conn = self._conn
        if timeout is None and conn is not None and not conn.closed:
            inbox = loop_inbox()
            if inbox is not None:
                return inbox.call(conn, fn, args, kwargs)
        return self._acall(fn, args, kwargs, timeout)

    async def _acall(self, fn, args, kwargs, timeout):
        conn = self._conn
        if conn is None or conn.closed:
            future = asyncio.wrap_future(self.call_async(fn, *args, **kwargs))
        else:
            future = loop_inbox().call(conn, fn, args, kwargs)
        if timeout is None:
            return await future
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise CallTimeout('[%s] %s did not finish within %ss' % (self.host, describe(fn), timeout))

    async def aput(self, local_path, remote_path=None, mode=0o644, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.put, local_path, remote_path, mode=mode, **kwargs))

    async def afetch(self, remote_path, local_path=None, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.fetch, remote_path, local_path, **kwargs))


class SubprocessTunnel(BaseTunnel):
    """A tunnel whose agent runs behind a local command (``cmd_args()``).

    The command's last argument is added by the tunnel: the python command
    line (``python -c STUB``, or an interpreter-finding shell loop).
    """

    def cmd_args(self):
        """The command that leads to the host, before the python command."""
        return []

    def python_args(self):
        if self.python:
            return bootstrap.python_argv(self.python)
        return ['/bin/sh', '-c', bootstrap.discovery_script()]

    def argv(self):
        return self.cmd_args() + self.python_args()

    def transport(self):
        argv = self.argv()
        # Named in errors without the bootstrap stub: 'sudo -n -H -u app -- python3'.
        shown = argv[:len(argv) - len(self.python_args()) + 1]
        return ProcessTransport(argv, what=' '.join(shlex.quote(a) for a in shown))


class Local(SubprocessTunnel):
    """A python subprocess on this machine: the controller's own interpreter
    unless ``python=`` names another."""

    # Our own interpreter is known before any agent says so.
    _same_version = {os.path.realpath(sys.executable): True}

    def __init__(self, name='localhost', python=None, **kwargs):
        super().__init__(name, python=python, **kwargs)

    def _version_key(self):
        return os.path.realpath(self.python or sys.executable)

    def python_args(self):
        return bootstrap.python_argv(self.python or sys.executable, self.compiled_agent)


class Sudo(BecomeTunnel, SubprocessTunnel):
    """A python running as another user on this machine (or on ``via``'s
    host), through sudo.

    Without ``password``, ``sudo -n`` never prompts: configure NOPASSWD, or
    the connection fails saying a password is needed.  ``password`` (a str,
    or a callable called once, when sudo asks) goes to ``sudo -S`` on its
    stdin ahead of the bootstrap, never in argv, the environment, a log or
    an error; a wrong one is a ConnectError at once.  See chopsticks.become.
    """

    method = 'sudo'

    def __init__(self, user='root', name=None, python=None, password=None, **kwargs):
        self._init_become(user, password)
        via = kwargs.get('via')
        where = 'localhost' if via is None else getattr(via, 'host', via)
        super().__init__(name or '%s@%s' % (user, where), python=python, **kwargs)

    def become_argv(self, prompt):
        if prompt is None:
            return ['sudo', '-n', '-H', '-u', self.user, '--']
        # -k: a cached credential would let a wrong password through unnoticed.
        return ['sudo', '-S', '-k', '-p', prompt, '-H', '-u', self.user, '--']

    def cmd_args(self):
        return self.become_argv(None)


class Su(Sudo):
    """A python running as another user through ``su`` (``su://user``).

    su reads a password from a terminal only, so Su takes none: it works
    where su lets the caller through without one (as root, say
    ``Su('app', via=Sudo())``).  For a password, use :class:`Sudo`.
    """

    method = 'su'
    accepts_password = False

    def become_argv(self, prompt):
        # su runs "$SHELL -c CMD ARGS": -s makes it sh, CMD execs the python
        # argv that follows the user; '--' keeps su from reading its '-c'.
        return ['su', '-s', '/bin/sh', '-c', 'exec "$0" "$@"', '--', self.user]


class Doas(Sudo):
    """A python running as another user through OpenBSD's ``doas -n``
    (``doas://user``); doas reads passwords from a terminal only, so
    configure ``permit nopass``."""

    method = 'doas'
    accepts_password = False

    def become_argv(self, prompt):
        return ['doas', '-n', '-u', self.user, '--']


class Docker(SubprocessTunnel):
    """A new container from ``image`` (removed afterwards unless ``rm=False``)."""

    def __init__(self, name, image='python:3', rm=True, python=None, **kwargs):
        self.image = image
        self.rm = rm
        super().__init__(name, python=python, **kwargs)

    def cmd_args(self):
        args = ['docker', 'run', '-i', '--name', self.host]
        if self.rm:
            args.append('--rm')
        return args + [self.image]


# host:port where the host has no colon outside brackets (a range such as
# web[1:3] in an inventory may hold one); '[v6]' and '[v6]:port' apart.
_HOST_PORT = re.compile(r'^((?:[^:\[\]]|\[[^\[\]]*\])+):([^:\[\]]*)$')
_BRACKETED = re.compile(r'^\[([^\[\]]*)\](?::(.*))?$')


def is_ipv6_address(text):
    """Whether the inside of brackets, ``text``, is an IPv6 address rather
    than an inventory range (``a:c``, ``1:9:2``: one or two colons): an
    address has '::' or at least three."""
    return '::' in text or text.count(':') >= 3


def split_host_port(hostport):
    """``'host:port'`` -> ``('host', port)``; a host without a port -> ``(host, None)``.

    IPv6 addresses are written bare (``'::1'``, no port: its colons are
    the address's) or in brackets (``'[::1]'``, ``'[::1]:2222'``); the
    brackets are removed.  Inventory ranges may come before the port
    (``'web[01:20]:2222'``).  A port that is not a number raises ValueError.
    """
    bracketed = _BRACKETED.match(hostport)
    if bracketed and is_ipv6_address(bracketed.group(1)):
        host, port = bracketed.group(1), bracketed.group(2)
    else:
        match = _HOST_PORT.match(hostport)
        if match is None:  # no port, or a bare IPv6 address
            return hostport, None
        host, port = match.group(1), match.group(2)
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('bad port %r in %r: host:port takes a number from 1 to 65535'
                         % (port, hostport))
    return host, int(port)


def split_ssh_address(address):
    """``'[user@]host[:port]'`` -> ``(user or None, host, port or None)``, as
    ``fabric.Connection`` reads its host (see :func:`split_host_port`)."""
    user, at, hostport = address.rpartition('@')
    host, port = split_host_port(hostport)
    return (user if at and user else None), host, port


def ssh_destination(address, user=None, port=None):
    """``(host, user, port)`` of an SSH ``address`` written ``[user@]host[:port]``,
    with ``user`` and ``port`` given apart.  Given both ways with different
    values, it raises ValueError, as ``fabric.Connection`` does."""
    short_user, host, short_port = split_ssh_address(address)
    for what, given, written in (('user', user, short_user), ('port', port, short_port)):
        if given is not None and written is not None and str(given) != str(written):
            raise ValueError('%s given twice for %r: %r in the address and %s=%r; '
                             'pick one' % (what, address, written, what, given))
    return (host, user if user is not None else short_user,
            port if port is not None else short_port)


class SSHTunnel(SubprocessTunnel):
    """A host over SSH.

    ``host`` is an ssh_config alias or host name, optionally written
    ``user@host:port`` as ``fabric.Connection`` takes it (an IPv6 address
    with a port in brackets: ``[::1]:2222``); ``user``/``port`` override the
    config, and given both in ``host`` and apart, must agree (else
    ValueError).  ``host`` may also be a ``fabric.Connection``, to reuse its
    settings.
    ``transport='openssh'`` runs the ``ssh`` binary; ``'paramiko'`` connects
    in-process through Fabric.  ``ssh_config`` names the ssh_config file
    (default ``~/.ssh/config``, or ``$CHOPSTICKS_SSH_CONFIG``);
    ``control_master=True`` (or a ControlPersist value) shares one OpenSSH
    connection between tunnels to the same host; ``keepalive`` (seconds) also
    sets OpenSSH's ServerAliveInterval; other keyword arguments are
    ssh_config options (``ConnectTimeout=5``, ``IdentityFile='~/.ssh/k'``).
    """

    def __init__(self, host, user=None, port=None, transport='openssh', python=None,
                 ssh_config=None, control_master=False,
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT, via=None, keepalive=None, **options):
        from .ssh import SSHSettings
        if isinstance(host, str):
            host, user, port = ssh_destination(host, user, port)
        self.transport_type = transport
        self.ssh_settings = SSHSettings(host, user, port, ssh_config, options,
                                        control_master, connect_timeout, keepalive)
        name = self.ssh_settings.host
        if user and '@' not in name:
            name = '%s@%s' % (user, name)
        super().__init__(name, python=python, connect_timeout=connect_timeout, via=via,
                         keepalive=keepalive)

    _same_version = {}  # type: dict  # its own: keyed by SSH destination

    def _version_key(self):
        s = self.ssh_settings
        return (s.host, s.user, s.port, s.ssh_config, self.python)

    def cmd_args(self):
        return self.ssh_settings.openssh_argv()

    def argv(self):
        return self.cmd_args() + [bootstrap.remote_command(self.python, self.compiled_agent)]

    def transport(self):
        from .ssh import make_transport
        return make_transport(self)


Tunnel = SSHTunnel

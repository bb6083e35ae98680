"""SSH settings from Fabric, and the two SSH transports.

* ``openssh`` (default): the ``ssh`` binary.  Lowest latency, and all of
  OpenSSH's own config handling (Include, Match, ProxyJump, known_hosts,
  agents, ControlMaster).  ``BatchMode=yes`` so nothing ever waits on a prompt.
* ``paramiko``: through a ``fabric.Connection``, for machines without
  ``ssh`` or connections that carry a password or key object.

Fabric supplies the configuration: ``~/.ssh/config`` (or the file named by
``ssh_config=`` / ``CHOPSTICKS_SSH_CONFIG``) and Fabric's own config files
and ``FABRIC_*`` variables.  Importing Fabric costs a quarter of a second, so
the OpenSSH transport only does it when there is Fabric configuration to
read (ssh reads ssh_config itself).

Host keys are verified by default on both transports.
"""
import glob
import math
import os
import shutil
import sys
import threading

from . import cache, wire
from .transport import NO_CAPABILITIES, ProcessTransport
from .errors import ConnectError
from .broker import get_broker

ENV_SSH_CONFIG = 'CHOPSTICKS_SSH_CONFIG'

# Put at the head of OpenSSH's default ciphers, unless the user's ssh
# configuration or options choose ciphers: AES-GCM runs on the CPU's AES
# instructions and moves bulk data about a third faster than the default
# chacha20-poly1305 (252 against 185 MB/s through ``ssh host cat`` here).
PREFERRED_CIPHERS = '^aes128-gcm@openssh.com,aes256-gcm@openssh.com'
CIPHER_HEAD_SINCE = (8, 2)  # the first OpenSSH that understands the '^' prefix
USER_SSH_CONFIG = '~/.ssh/config'
SYSTEM_SSH_CONFIG = '/etc/ssh/ssh_config'
FABRIC_CONFIG_FILES = ('/etc/fabric.*', '~/.fabric.*')


def default_ssh_config():
    path = os.environ.get(ENV_SSH_CONFIG)
    return os.path.expanduser(path) if path else None


def fabric_configured():
    """True when Fabric config files or FABRIC_* variables exist."""
    if any(k.startswith('FABRIC_') for k in os.environ):
        return True
    return any(glob.glob(os.path.expanduser(p)) for p in FABRIC_CONFIG_FILES)


def fabric_connection(host, user=None, port=None, ssh_config=None, connect_timeout=None):
    """A fresh ``fabric.Connection`` with its own Config (a shared one leaks
    IdentityFile entries between hosts)."""
    from fabric import Config, Connection
    config = Config(runtime_ssh_path=ssh_config) if ssh_config else Config()
    return Connection(host, user=user, port=port, config=config,
                      connect_timeout=connect_timeout)


class SSHSettings(object):
    """Where and how to connect, resolved once per tunnel."""

    def __init__(self, host, user=None, port=None, ssh_config=None, options=None,
                 control_master=False, connect_timeout=None, keepalive=None):
        self.connection = None
        if hasattr(host, 'original_host') and hasattr(host, 'connect_kwargs'):
            self.connection = host  # a fabric.Connection
            host = host.original_host
        self.host = host
        self.user = user
        self.port = int(port) if port is not None else None
        self.ssh_config = ssh_config or default_ssh_config()
        self.options = dict(options or {})
        self.control_master = control_master
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.identity_files = []
        self.proxy_jump = None
        if self.connection is not None or fabric_configured():
            self._from_fabric()

    def _from_fabric(self):
        conn = self.connection
        if conn is None:
            conn = fabric_connection(self.host, self.user, self.port, self.ssh_config)
        self.user = self.user or conn.user
        self.port = self.port or conn.port
        kwargs = conn.connect_kwargs or {}
        files = kwargs.get('key_filename') or []
        self.identity_files = [files] if isinstance(files, str) else list(files)
        gateway = conn.gateway
        if gateway is not None and not isinstance(gateway, str):
            self.proxy_jump = '%s@%s:%s' % (gateway.user, gateway.host, gateway.port)
        elif isinstance(gateway, str):
            self.options.setdefault('ProxyCommand', gateway)

    def needs_paramiko(self):
        """A Connection carrying secrets that ``ssh`` cannot take on its command line."""
        kwargs = (self.connection.connect_kwargs or {}) if self.connection is not None else {}
        return any(kwargs.get(k) for k in ('password', 'pkey', 'passphrase', 'sock'))

    def openssh_argv(self):
        ssh = shutil.which('ssh')
        if ssh is None:
            raise FileNotFoundError('the ssh command is not installed (use transport="paramiko")')
        argv = [ssh, '-T', '-o', 'BatchMode=yes']
        # ssh keeps the first value it sees: leave these to an option the caller gave.
        given = {key.lower() for key in self.options}
        # keepalive= asks for ServerAliveInterval; without it, our defaults
        # only fill in what the user's ssh_config leaves unset.
        scope = (ssh, self.ssh_config, self.host, self.user, self.port)
        if 'serveraliveinterval' not in given and (
                self.keepalive or not _set_for_host('serveraliveinterval', *scope)):
            interval = max(1, int(math.ceil(self.keepalive))) if self.keepalive else 15
            argv += ['-o', 'ServerAliveInterval=%d' % interval]
        if 'serveralivecountmax' not in given and \
                not _set_for_host('serveralivecountmax', *scope):
            argv += ['-o', 'ServerAliveCountMax=3']
        if self.ssh_config:
            argv += ['-F', self.ssh_config]
        if self.connect_timeout:
            argv += ['-o', 'ConnectTimeout=%d' % max(1, int(self.connect_timeout))]
        if self.user:
            argv += ['-l', self.user]
        if self.port:
            argv += ['-p', str(self.port)]
        for path in self.identity_files:
            argv += ['-i', os.path.expanduser(path)]
        if self.proxy_jump:
            argv += ['-J', self.proxy_jump]
        if 'ciphers' not in given and _may_choose_ciphers(*scope):
            argv += ['-o', 'Ciphers=' + PREFERRED_CIPHERS]
        if self.control_master:
            path = os.path.expanduser('~/.cache/chopsticks')
            os.makedirs(path, mode=0o700, exist_ok=True)
            argv += ['-o', 'ControlMaster=auto', '-o', 'ControlPath=%s/cm-%%C' % path,
                     '-o', 'ControlPersist=%s' % (self.control_master if not isinstance(
                         self.control_master, bool) else 60)]
        for key, value in self.options.items():
            argv += ['-o', '%s=%s' % (key, value)]
        return argv + ['--', self.host]


# What OpenSSH reads when ssh_config names no UserKnownHostsFile or
# GlobalKnownHostsFile (ssh_config(5)).
DEFAULT_USER_KNOWN_HOSTS = ('~/.ssh/known_hosts', '~/.ssh/known_hosts2')
DEFAULT_GLOBAL_KNOWN_HOSTS = ('/etc/ssh/ssh_known_hosts', '/etc/ssh/ssh_known_hosts2')


def known_hosts_files(host_config):
    """The known_hosts files OpenSSH would read for a host, given its resolved
    ssh_config (a mapping of lower-case keywords, as paramiko's SSHConfig
    lookup returns): UserKnownHostsFile and GlobalKnownHostsFile where set,
    else their defaults.  Only files that exist are returned."""
    files = []
    for keyword, defaults in (('userknownhostsfile', DEFAULT_USER_KNOWN_HOSTS),
                              ('globalknownhostsfile', DEFAULT_GLOBAL_KNOWN_HOSTS)):
        value = host_config.get(keyword)
        if isinstance(value, (list, tuple)):
            value = ' '.join(value)
        paths = str(value).split() if value else defaults
        if [p.lower() for p in paths] == ['none']:
            continue
        files += [os.path.expanduser(p) for p in paths]
    return [p for p in files if os.path.isfile(p)]


def _configured(keyword, ssh_config):
    """Whether any ssh_config file that ``ssh`` reads mentions ``keyword``,
    for any host (the cheap first test of _set_for_host)."""
    return any(keyword in _config_keywords(path, path == SYSTEM_SSH_CONFIG)
               for path in _config_files(ssh_config))


def _may_choose_ciphers(ssh, ssh_config, host, user=None, port=None):
    """True when ssh_config sets no Ciphers for ``host`` and this ssh
    understands ``Ciphers=^...``."""
    version = _openssh_version(ssh)
    if version is None or version < CIPHER_HEAD_SINCE:
        return False
    return not _set_for_host('ciphers', ssh, ssh_config, host, user, port)


def _set_for_host(keyword, ssh, ssh_config, host, user=None, port=None):
    """Whether the ssh_config files give ``host`` a value for ``keyword``
    (lower case) other than ssh's default.  Most configurations never mention
    the keyword: then no process is started.  When one does, it may be in
    another host's Host or Match block: ``ssh -G`` resolves it for this host."""
    if not _configured(keyword, ssh_config):
        return False
    resolved = _resolved_for_host(ssh, ssh_config, host, user, port)
    default = _resolved_for_host(ssh, os.devnull, 'chopsticks.invalid')
    if resolved is None or default is None:
        return True  # unknown: leave ssh's own choice alone
    return resolved.get(keyword) != default.get(keyword)


_resolved_cache = {}  # type: dict  # (ssh, config, host, user, port) -> (config files' state, settings)


def _config_files(ssh_config):
    if ssh_config:
        return [ssh_config]  # ssh -F reads that file alone
    return [os.path.expanduser(USER_SSH_CONFIG), SYSTEM_SSH_CONFIG]


def _resolved_for_host(ssh, ssh_config, host, user=None, port=None):
    """``ssh -G``'s settings for a host ({keyword: value}), or None.  Asked
    once per host while the config files (and those they include) keep their
    modification times: a connect pays ssh -G (about 8 ms) the first time only."""
    import subprocess
    files = _config_files(ssh_config)
    for path in files:
        _config_keywords(path, path == SYSTEM_SSH_CONFIG)  # records the files' mtimes
    state = tuple(_config_cache[path][0] for path in files)
    key = (ssh, ssh_config, host, user, port)
    known = _resolved_cache.get(key)
    if known is not None and known[0] == state:
        return known[1]
    argv = [ssh, '-G'] + (['-F', ssh_config] if ssh_config else []) \
        + (['-l', user] if user else []) + (['-p', str(port)] if port else []) + ['--', host]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    settings = {}
    for line in out.decode('utf-8', 'replace').splitlines():
        words = line.split(None, 1)
        if words:
            settings.setdefault(words[0].lower(), words[1].strip() if len(words) > 1 else '')
    settings = settings or None
    _resolved_cache[key] = (state, settings)
    return settings


_config_cache = {}  # type: dict  # path -> ((path, mtime) of every file read, keywords used)


def _config_keywords(path, system=False):
    """The keywords (lower case) in the ssh_config file ``path`` and the files it includes."""
    cached = _config_cache.get(path)
    if cached is not None and all(_mtime(p) == m for p, m in cached[0]):
        return cached[1]
    seen = []
    keywords = set()
    # Relative Include paths are under ~/.ssh in a user's file, /etc/ssh in the system's.
    base = os.path.dirname(SYSTEM_SSH_CONFIG) if system else os.path.expanduser('~/.ssh')
    _scan_config(path, base, 0, seen, keywords)
    _config_cache[path] = (tuple(seen), keywords)
    return keywords


def _scan_config(path, base, depth, seen, keywords):
    seen.append((path, _mtime(path)))
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        words = line.strip().replace('=', ' ', 1).split()
        if not words or words[0].startswith('#'):
            continue
        word = words[0].lower()
        keywords.add(word)
        if word == 'include' and depth < 16:
            for pattern in words[1:]:
                pattern = os.path.expanduser(pattern)
                if not os.path.isabs(pattern):
                    pattern = os.path.join(base, pattern)
                for included in sorted(glob.glob(pattern)):
                    _scan_config(included, base, depth + 1, seen, keywords)


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


_versions = {}


def _openssh_version(ssh):
    """(major, minor) of the OpenSSH client ``ssh``; None if unknown.  Asked
    once per process, and kept in the user's cache for the next while the
    binary stays the same (``ssh -V`` costs 8 ms before a first connect)."""
    if ssh not in _versions:
        try:
            info = os.stat(ssh)
            binary = [os.path.realpath(ssh), info.st_mtime_ns, info.st_size]
        except OSError:
            binary = None
        known = cache.fact('openssh', binary) if binary is not None else None
        if known is not None:
            _versions[ssh] = tuple(known)
        else:
            _versions[ssh] = _ask_openssh_version(ssh)
            if binary is not None and _versions[ssh] is not None:
                cache.learn('openssh', binary, list(_versions[ssh]))
    return _versions[ssh]


def _ask_openssh_version(ssh):
    import re
    import subprocess
    try:
        banner = subprocess.run([ssh, '-V'], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(rb'OpenSSH_(\d+)\.(\d+)', banner)
    return (int(match.group(1)), int(match.group(2))) if match else None


PARAMIKO_PACKET = 32768  # what _next_piece joins small frames up to (sshd takes 32 KiB packets)
# The biggest packet we let the host send us.  paramiko spends its time per
# packet, in Python: at OpenSSH's 32 KiB a 256 MiB fetch ran at 142-178 MB/s,
# at 128 KiB 240-257 MB/s.  OpenSSH sends what we allow, up to 256 KiB.
PARAMIKO_RECEIVE_PACKET = 128 << 10


def _next_piece(views):
    """What to send next from ``views``: small frames joined up to a packet,
    since each send costs paramiko a packet (and its encryption) of its own;
    a large buffer in slices, since paramiko's sendall is quadratic on a
    small window."""
    first = views[0]
    if len(first) >= PARAMIKO_PACKET or len(views) == 1:
        return first[:1 << 20]
    piece = bytearray(first)
    for view in views[1:]:
        if len(piece) + len(view) > PARAMIKO_PACKET:
            break
        piece += view
    return piece


class ParamikoTransport(object):
    """The agent behind a paramiko session channel of a Fabric connection
    (a ``chopsticks.transport.Transport``): the broker reads it, and file
    regions go as bytes."""

    capabilities = NO_CAPABILITIES

    def __init__(self, settings, command, host):
        self.settings = settings
        self.command = command
        self.host = host
        self.conn = None
        self.channel = None
        self.closed = False

    def start(self, conn):
        import paramiko
        settings = self.settings
        fabric_conn = settings.connection or fabric_connection(
            settings.host, settings.user, settings.port, settings.ssh_config,
            settings.connect_timeout)
        if settings.connection is not None and settings.connect_timeout:
            fabric_conn.connect_timeout = settings.connect_timeout
        client = fabric_conn.client
        strict = str(fabric_conn.ssh_config.get('stricthostkeychecking', 'yes')).lower()
        client.set_missing_host_key_policy(
            paramiko.WarningPolicy() if strict == 'no' else paramiko.RejectPolicy())
        for path in known_hosts_files(fabric_conn.ssh_config):
            try:
                # As system keys: paramiko never writes these files back.
                client.load_system_host_keys(path)
            except OSError:
                pass  # unreadable, as ssh would skip it
        self.conn = fabric_conn
        try:
            fabric_conn.open()
            ssh_transport = fabric_conn.client.get_transport()
            sock = ssh_transport.sock
            if hasattr(sock, 'setsockopt'):
                import socket
                # Small frames must not wait for Nagle's algorithm (40 ms round trips).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = ssh_transport.open_session(window_size=8 << 20,
                                                   max_packet_size=PARAMIKO_RECEIVE_PACKET)
            channel.exec_command(self.command)
        except Exception as e:
            raise ConnectError(self.host, 'ssh (paramiko) to %s failed: %s: %s'
                               % (fabric_conn.host, type(e).__name__, e))
        self.channel = channel
        self.write_lock = threading.Lock()
        get_broker().register(channel, lambda: self._pump(conn))

    def _pump(self, conn):
        # Until neither stream has data: paramiko signals both through one
        # pipe (channel.fileno()), and its two halves set and clear it without
        # a common lock.  A read draining one stream while the transport
        # thread feeds the other can leave the pipe clear with data waiting,
        # and then nothing wakes us for it, or for the replies after it: a
        # host writing to stderr hung its tunnel (1 call in ~300 over 16 hosts).
        channel = self.channel
        got = False
        while True:
            while channel.recv_stderr_ready():
                conn.feed_stderr(channel.recv_stderr(1 << 20))
                got = True
            while channel.recv_ready():
                data = channel.recv(1 << 20)
                if not data:
                    break
                conn.feed(data)
                got = True
            if not (channel.recv_stderr_ready() or channel.recv_ready()):
                break
        if not got and (channel.closed or channel.eof_received):
            get_broker().unregister(channel)
            conn.eof()

    def write(self, parts):
        views = wire.byte_views(parts)
        while views:
            piece = _next_piece(views)
            self.channel.sendall(piece)
            wire.drop_written(views, len(piece))

    def wide_pipe(self, direction):
        """No pipes to widen: the data goes through paramiko's socket."""
        return wire.WidePipe(None)

    def kill(self):
        """Drop the connection now (it is dead): a blocked send fails."""
        transport = self.channel.get_transport() if self.channel is not None else None
        sock = getattr(transport, 'sock', None)
        if sock is not None:
            sock.close()

    def write_nowait(self, parts):
        """Send what the channel's window takes now; return the views left unsent."""
        views = wire.byte_views(parts)
        channel = self.channel
        while views and channel.send_ready():
            wire.drop_written(views, channel.send(_next_piece(views)))
        return views

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.channel is not None:
            get_broker().unregister(self.channel)
        if self.conn is not None:
            # Off this thread: closing waits for paramiko's.  At interpreter
            # exit a new thread never starts (and start() would wait for it
            # forever), so close here.
            if sys.is_finalizing():
                self.conn.close()
            else:
                threading.Thread(target=self.conn.close, daemon=True).start()


def make_transport(tunnel):
    """The transport for an SSHTunnel."""
    settings = tunnel.ssh_settings
    from . import bootstrap
    command = bootstrap.remote_command(tunnel.python, tunnel.compiled_agent)
    if tunnel.transport_type == 'paramiko' or settings.needs_paramiko():
        return ParamikoTransport(settings, command, tunnel.host)
    if tunnel.transport_type != 'openssh':
        raise ValueError("transport must be 'openssh' or 'paramiko', not %r" % tunnel.transport_type)
    try:
        argv = settings.openssh_argv()
    except FileNotFoundError as e:
        raise ConnectError(tunnel.host, str(e))
    return ProcessTransport(argv + [command], what='ssh %s' % settings.host)

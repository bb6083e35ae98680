"""A throwaway OpenSSH server on 127.0.0.1 for tests and benchmarks.

:class:`LoopbackSSHD` runs the real ``/usr/sbin/sshd`` with its own host key,
client key, ``authorized_keys`` and ``ssh_config``, all in one temporary
directory, so chopsticks is exercised over genuine SSH without touching the
machine's own configuration::

    with LoopbackSSHD(aliases=('host1', 'host2')) as sshd:
        subprocess.run(sshd.ssh_argv('host1', 'true'), check=True)
        os.environ.update(sshd.env())      # point chopsticks at it

Host keys are verified (``StrictHostKeyChecking yes`` with a pre-filled
``known_hosts``), exactly as a careful user would configure a real fleet.

Standard library only; works as root and as an ordinary user.
"""

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence

__all__ = ['LoopbackSSHD', 'SSHDNotFound']

DEFAULT_SSHD = '/usr/sbin/sshd'
# sshd refuses to start as root unless its privilege-separation chroot exists;
# distribution packages create it from a tmpfiles/systemd unit we never run.
PRIVSEP_DIR = '/run/sshd'


class SSHDNotFound(RuntimeError):
    """The OpenSSH server binary is not installed.

    A separate type so a test fixture can turn exactly this into a skip while
    letting every other start-up failure fail loudly.
    """


class LoopbackSSHD:
    """An ``sshd`` listening on ``127.0.0.1`` that accepts one generated key.

    The server is started by the constructor and is ready (a real ``ssh``
    login has succeeded) when it returns. Stop it with :meth:`stop` or by using
    the instance as a context manager; both remove the temporary directory.

    :param aliases: host names written to :attr:`ssh_config`; each one is a
        ``Host`` block leading to this server.
    :param user: account to log in as; defaults to the current user. Only
        root may serve another user, and that account must not be locked
        (``UsePAM no`` makes sshd refuse accounts whose password starts
        with ``!``).
    :param sshd_path: the server binary; sshd insists on an absolute path.
    :param start_timeout: seconds to wait for the first successful login.
    :param extra_config: ``sshd_config`` lines for tests that need a
        differently configured server; they take precedence over the defaults.

    Attributes a caller may rely on: :attr:`ssh_config`, :attr:`port`,
    :attr:`aliases`, :attr:`user`, :attr:`client_key` (private key path),
    :attr:`known_hosts`, :attr:`host_key_pub` (host public key path),
    :attr:`directory`, :attr:`log_path`.
    """

    def __init__(
        self,
        aliases: Sequence[str] = ('host1',),
        *,
        user: Optional[str] = None,
        sshd_path: str = DEFAULT_SSHD,
        start_timeout: float = 30.0,
        extra_config: Sequence[str] = (),
    ) -> None:
        if isinstance(aliases, str):
            aliases = (aliases,)
        if not aliases:
            raise ValueError('LoopbackSSHD needs at least one host alias')
        self.aliases = tuple(aliases)
        self.sshd_path = sshd_path
        self.start_timeout = start_timeout
        self._extra_config = list(extra_config)
        self._proc: Optional[subprocess.Popen] = None

        if not (os.path.isabs(sshd_path) and os.access(sshd_path, os.X_OK)):
            raise SSHDNotFound(f'sshd not found: install openssh-server (looked for {sshd_path})')
        for tool in ('ssh', 'ssh-keygen'):
            if shutil.which(tool) is None:
                raise SSHDNotFound(f'{tool} not found: install openssh-client')

        current_user = pwd.getpwuid(os.geteuid()).pw_name  # not $USER: wrong under sudo -E
        self.user = user or current_user
        if self.user != current_user and os.geteuid() != 0:
            raise ValueError(
                f'LoopbackSSHD: only root can serve logins as {self.user!r}; '
                f'running as {current_user!r}'
            )

        self.directory = tempfile.mkdtemp(prefix='chopsticks-sshd-')
        # Cleans up even if the caller forgets stop(), e.g. when a test crashes.
        self._state: Dict[str, Any] = {'proc': None, 'directory': self.directory}
        self._finalizer = weakref.finalize(self, _cleanup, self._state)
        try:
            self._prepare_files()
            self._start_with_free_port()
        except BaseException:
            self.stop()
            raise

    # -- public API ---------------------------------------------------------

    def env(self) -> Dict[str, str]:
        """Environment variables that point chopsticks at this server."""
        return {'CHOPSTICKS_SSH_CONFIG': self.ssh_config}

    def ssh_argv(self, alias: str, *cmd: str) -> List[str]:
        """The OpenSSH client command line that runs *cmd* on *alias*."""
        return ['ssh', '-F', self.ssh_config, alias, *cmd]

    def log_text(self) -> str:
        """Everything sshd has logged so far (``LogLevel VERBOSE``)."""
        try:
            with open(self.log_path, encoding='utf-8', errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    @property
    def running(self) -> bool:
        """Whether the listening sshd process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def stop_daemon(self) -> None:
        """Stop the listening sshd but keep port, keys and configs.

        Sessions already open survive: each runs in its own sshd process.
        Connections made while stopped are refused, as with a host whose
        sshd is down.
        """
        proc, self._proc = self._proc, None
        self._state['proc'] = None
        _terminate(proc)

    def start_daemon(self) -> None:
        """Start sshd again on the same port with the same keys; waits until ready."""
        if self.running:
            return
        self._launch()
        self._wait_ready()

    def restart(self) -> None:
        """Stop and start sshd on the same port and keys (for fault tests)."""
        self.stop_daemon()
        self.start_daemon()

    def stop(self) -> None:
        """Terminate sshd and remove the temporary directory. Idempotent."""
        self.stop_daemon()
        self._finalizer()

    def __enter__(self) -> 'LoopbackSSHD':
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = 'running' if self.running else 'stopped'
        return f'<LoopbackSSHD 127.0.0.1:{getattr(self, "port", "?")} {self.user} {state}>'

    # -- setup --------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _prepare_files(self) -> None:
        # Traversable by the login user: sshd reads AuthorizedKeysFile with the
        # user's uid. Private keys stay 0600 inside.
        os.chmod(self.directory, 0o711)
        self.host_key = self._path('ssh_host_ed25519_key')
        self.host_key_pub = self.host_key + '.pub'
        self.client_key = self._path('client_ed25519')
        self.authorized_keys = self._path('authorized_keys')
        self.known_hosts = self._path('known_hosts')
        self.sshd_config = self._path('sshd_config')
        self.ssh_config = self._path('ssh_config')
        self.log_path = self._path('sshd.log')
        self.pid_file = self._path('sshd.pid')

        _keygen(self.host_key, 'chopsticks-loopback-host')
        _keygen(self.client_key, 'chopsticks-loopback-client')
        shutil.copyfile(self.client_key + '.pub', self.authorized_keys)
        os.chmod(self.authorized_keys, 0o644)

        self._sshd_version = _sshd_version(self.sshd_path)
        if os.geteuid() == 0 and not os.path.isdir(PRIVSEP_DIR):
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)

    def _write_configs(self) -> None:
        # sshd keeps the first value it reads for a keyword, so caller's lines go first.
        lines = self._extra_config + [
            'ListenAddress 127.0.0.1',
            f'Port {self.port}',
            f'HostKey {self.host_key}',
            f'PidFile {self.pid_file}',
            f'AuthorizedKeysFile {self.authorized_keys}',
            # The key files live under /tmp, which is world-writable: StrictModes
            # would reject them. Their modes are set correctly above anyway.
            'StrictModes no',
            'PubkeyAuthentication yes',
            'PasswordAuthentication no',
            'KbdInteractiveAuthentication no',
            'PermitRootLogin prohibit-password',
            # PAM's session stack (pam_loginuid, motd) fails inside containers
            # and cannot work for a non-root sshd.
            'UsePAM no',
            'UseDNS no',
            'PrintMotd no',
            'PrintLastLog no',
            'X11Forwarding no',
            'AllowTcpForwarding yes',
            'Subsystem sftp internal-sftp',
            # Tests and the benchmark open 64 connections at once.
            'MaxStartups 200',
            'MaxSessions 200',
            'LogLevel VERBOSE',
        ]
        if self._sshd_version >= (9, 8):
            # Otherwise the refused logins of fault tests get 127.0.0.1 banned.
            lines.append('PerSourcePenalties no')
        _write(self.sshd_config, lines, 0o600)

        with open(self.host_key_pub, encoding='ascii') as f:
            key_type, key_blob = f.read().split()[:2]
        _write(self.known_hosts, [f'[127.0.0.1]:{self.port} {key_type} {key_blob}'], 0o644)

        blocks = []
        for alias in self.aliases:
            blocks += [
                f'Host {alias}',
                '    HostName 127.0.0.1',
                f'    Port {self.port}',
                f'    User {self.user}',
                f'    IdentityFile {self.client_key}',
                '    IdentitiesOnly yes',
                f'    UserKnownHostsFile {self.known_hosts}',
                '    GlobalKnownHostsFile /dev/null',
                '    StrictHostKeyChecking yes',
                '    CheckHostIP no',
                '    UpdateHostKeys no',
                '    PasswordAuthentication no',
                '    KbdInteractiveAuthentication no',
                '    BatchMode yes',
                '    ConnectTimeout 10',
                '    LogLevel ERROR',
                '',
            ]
        _write(self.ssh_config, blocks, 0o644)

    # -- process control ----------------------------------------------------

    def _start_with_free_port(self) -> None:
        # A free port can be taken by someone else between our probe and
        # sshd's bind; pick another one a few times before giving up.
        for _attempt in range(5):
            self.port = _free_port()
            open(self.log_path, 'wb').close()  # judge each attempt by its own log
            self._write_configs()
            self._launch()
            try:
                self._wait_ready()
                return
            except _PortTaken:
                self.stop_daemon()
        raise RuntimeError(f'LoopbackSSHD: could not bind a free port on 127.0.0.1\n{self.log_text()}')

    def _launch(self) -> None:
        argv = [self.sshd_path, '-D', '-e', '-E', self.log_path, '-f', self.sshd_config]
        with open(self.log_path, 'ab') as log:
            self._log_offset = log.tell()
            # Own session: a Ctrl-C aimed at the test run is not also sent to sshd.
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self._state['proc'] = self._proc

    def _log_since_launch(self) -> str:
        with open(self.log_path, 'rb') as f:
            f.seek(self._log_offset)
            return f.read().decode('utf-8', 'replace')

    def _wait_ready(self) -> None:
        started = time.monotonic()
        deadline = started + self.start_timeout
        alias = self.aliases[0]
        last_error = ''
        while True:
            if self._proc is None or self._proc.poll() is not None:
                log = self.log_text()
                if 'Address already in use' in self._log_since_launch():
                    raise _PortTaken(
                        f'LoopbackSSHD: 127.0.0.1:{self.port} is taken by another process\n'
                        f'--- sshd log ({self.log_path}) ---\n{log}'
                    )
                raise RuntimeError(
                    f'LoopbackSSHD: sshd exited with status '
                    f'{self._proc.returncode if self._proc else "?"} on 127.0.0.1:{self.port}\n'
                    f'--- sshd log ({self.log_path}) ---\n{log}'
                )
            # sshd logs this once bound; probing the port with a bare connect
            # instead would litter the log with aborted handshakes. (A quieter
            # LogLevel from extra_config hides it: then just try.)
            if 'Server listening on' in self._log_since_launch() or time.monotonic() > started + 2:
                probe = subprocess.run(
                    self.ssh_argv(alias, 'true'),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    timeout=max(1.0, deadline - time.monotonic()) + 5,
                )
                if probe.returncode == 0:
                    return
                last_error = probe.stderr.decode('utf-8', 'replace').strip()
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)

        log = self.log_text()
        hint = ''
        if 'account is locked' in log:
            hint = (
                f"\nhint: the account {self.user!r} is locked; with UsePAM no sshd refuses it. "
                f"Unlock it with: usermod -p '*' {self.user}"
            )
        raise RuntimeError(
            f'LoopbackSSHD: no successful ssh login to {alias} (127.0.0.1:{self.port} as '
            f'{self.user}) within {self.start_timeout:g}s\n'
            f'ssh said: {last_error or "(nothing)"}{hint}\n'
            f'--- sshd log ({self.log_path}) ---\n{log}'
        )


class _PortTaken(RuntimeError):
    """sshd could not bind its port; the fresh-port loop tries another."""


def _cleanup(state: dict) -> None:
    _terminate(state.get('proc'))
    state['proc'] = None
    shutil.rmtree(state['directory'], ignore_errors=True)


def _terminate(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _keygen(path: str, comment: str) -> None:
    result = subprocess.run(
        ['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', comment, '-f', path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f'LoopbackSSHD: ssh-keygen failed for {path}: '
            f'{result.stdout.decode("utf-8", "replace").strip()}'
        )


def _sshd_version(sshd_path: str) -> tuple:
    """(major, minor) of the OpenSSH server, or (0, 0) when it cannot tell."""
    # Releases before 9.2 have no -V but print the version in their usage text.
    result = subprocess.run(
        [sshd_path, '-V'], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    match = re.search(rb'OpenSSH_(\d+)\.(\d+)', result.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write(path: str, lines: Sequence[str], mode: int) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    os.chmod(path, mode)

"""Faults: hosts that die or freeze, links that stall, sshd going away, a
controller interrupted.  Real processes, a real sshd and real signals.

What a user relies on, in every case: nothing hangs (a pending call fails
with an error naming the host), nothing is half-written, the tunnel
reconnects on next use and the other tunnels carry on.
"""
import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from chopsticks import CallTimeout, ConnectError, Local, Tunnel, TunnelClosed
from remote_helpers import echo, sleep_then

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
SLOWLINK = os.path.join(os.path.dirname(REPO), 'shared', 'tools', 'slowlink.py')

KILL_DEADLINE = 1.0  # seconds within which a killed host fails every pending call


# --- helpers ----------------------------------------------------------------------------

def state_of(pid):
    """The process state letter from /proc (None when the process is gone)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid):
    return state_of(pid) not in (None, 'Z', 'X')


def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def make_tunnel(kind, host='host1', **kwargs):
    if kind == 'local':
        return Local(host if host != 'host1' else 'localhost', **kwargs)
    return Tunnel(host, transport=kind, **kwargs)


def failure_of(future):
    """The exception a pending call fails with (it must not succeed or hang)."""
    try:
        value = future.result(timeout=30)
    except Exception as e:
        return e
    pytest.fail('%r returned %r' % (future, value))


KINDS = ['local', 'openssh', 'paramiko']


@pytest.fixture(params=KINDS)
def kind(request, sshd):
    return request.param


@pytest.fixture(params=['openssh', 'paramiko'])
def ssh_transport(request, sshd):
    return request.param


# --- the remote process killed -----------------------------------------------------------

def write_file(path, size):
    data = os.urandom(size)
    with open(path, 'wb') as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def test_killed_remote_fails_everything_pending_and_nothing_else(kind, tmp_path):
    """SIGKILL the agent while calls, an iterator, a put and a fetch are in
    flight on its tunnel and a put runs on another tunnel."""
    size = 12 << 20
    src = tmp_path / 'src.bin'
    write_file(src, size)
    fetch_src = tmp_path / 'fetch-src.bin'
    write_file(fetch_src, size)
    put_dest = tmp_path / 'put-dest'
    put_dest.write_bytes(b'old put destination')
    fetch_dest = tmp_path / 'fetch-dest'
    fetch_dest.write_bytes(b'old fetch destination')
    victim = make_tunnel(kind)
    bystander = make_tunnel(kind, host='host2')
    try:
        pid = victim.remote_info['pid']
        bystander.connect()
        calls = [victim.call_async(sleep_then, 60, n) for n in range(3)]
        items = victim.call_iter(range, 10 ** 9)
        started = threading.Event()
        results = {}

        def transfer(name, fn):
            try:
                results[name] = ('ok', fn())
            except Exception as e:
                results[name] = (e, time.monotonic())

        def slow_progress(done, total):
            started.set()
            time.sleep(0.01)  # keep the transfer in flight until the kill
        threads = [
            threading.Thread(target=transfer, args=('put', lambda: victim.put(
                str(src), str(put_dest), progress=slow_progress))),
            threading.Thread(target=transfer, args=('fetch', lambda: victim.fetch(
                str(fetch_src), str(fetch_dest), progress=slow_progress))),
            threading.Thread(target=transfer, args=('bystander', lambda: bystander.put(
                str(src), str(tmp_path / 'bystander-dest')))),
        ]
        for t in threads:
            t.start()
        assert started.wait(20)
        next(items)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)

        for future in calls:
            exc = failure_of(future)
            assert isinstance(exc, TunnelClosed) and '[%s]' % victim.host in str(exc)
        assert time.monotonic() - killed_at < KILL_DEADLINE
        with pytest.raises(TunnelClosed, match=r'\[%s\]' % victim.host):
            for _ in items:
                pass
        for t in threads:
            t.join(30)
        for name in ('put', 'fetch'):
            exc, when = results[name]
            assert isinstance(exc, Exception), (name, exc)
            assert '[%s]' % victim.host in str(exc) and name in str(exc)
            assert when - killed_at < KILL_DEADLINE + 0.5  # the transfer thread wakes up too

        # nothing half-written at either destination
        assert put_dest.read_bytes() == b'old put destination'
        assert fetch_dest.read_bytes() == b'old fetch destination'
        visible = sorted(n for n in os.listdir(tmp_path) if not n.startswith('.'))
        assert visible == ['bystander-dest', 'fetch-dest', 'fetch-src.bin', 'put-dest', 'src.bin']
        # the other tunnel was unaffected
        assert results['bystander'][0] == 'ok'
        assert (tmp_path / 'bystander-dest').read_bytes() == src.read_bytes()
        assert bystander.call(echo, 'fine') == 'fine'
        # and the victim reconnects on next use
        assert victim.call(os.getpid) != pid
        assert victim.put(str(src), str(put_dest))['size'] == size
        assert not [n for n in os.listdir(tmp_path) if '.chopsticks-' in n]  # temp file swept
    finally:
        victim.close()
        bystander.close()


def test_killed_ssh_session_is_a_lost_connection(ssh_transport):
    """The host's side of the SSH connection dies (a reboot, a killed sshd
    session): pending calls fail at once, naming the host."""
    t = Tunnel('host1', transport=ssh_transport)
    try:
        agent = t.remote_info['pid']
        session = int(open('/proc/%d/stat' % agent).read().rsplit(')', 1)[1].split()[1])
        pending = t.call_async(sleep_then, 60, 'never')
        os.kill(session, signal.SIGKILL)
        exc = failure_of(pending)
        assert isinstance(exc, TunnelClosed) and '[host1]' in str(exc)
        assert wait_until(lambda: not alive(agent))  # the agent saw its stdin close
        assert t.call(echo, 'again') == 'again'
    finally:
        t.close()


# --- a frozen host and a stalled link ------------------------------------------------------

def test_frozen_host_does_not_stall_other_tunnels():
    """A host that stops reading (SIGSTOP here; swap death or a hung kernel
    in life) while calls pile up for it: the pipe to it fills, yet other
    tunnels keep answering, and nothing is lost once it resumes."""
    frozen, healthy = Local('frozen'), Local('healthy')
    try:
        pid = frozen.remote_info['pid']
        healthy.connect()
        os.kill(pid, signal.SIGSTOP)
        futures = []

        def pile_up():
            for n in range(2000):
                futures.append(frozen.call_async(echo, (n, b'x' * 2000)))
        sender = threading.Thread(target=pile_up, daemon=True)
        sender.start()
        time.sleep(1.0)
        assert sender.is_alive()  # stuck: the frozen host's pipe is full (4 MB > 64 KiB)
        for n in range(20):
            assert healthy.call(echo, n, timeout=10) == n
        os.kill(pid, signal.SIGCONT)
        sender.join(60)
        assert [f.result(60)[0] for f in futures] == list(range(2000))
    finally:
        os.kill(pid, signal.SIGCONT)
        frozen.close()
        healthy.close()


def test_keepalive_declares_a_frozen_host_lost():
    t = Local('frozen', keepalive=0.5)
    other = Local('other')
    try:
        pid = t.remote_info['pid']
        pending = t.call_async(sleep_then, 60, 'never')
        start = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        exc = failure_of(pending)
        assert isinstance(exc, TunnelClosed)
        assert '[frozen]' in str(exc) and 'keepalive' in str(exc)
        assert time.monotonic() - start < 3  # a ping at K/2, lost at K: well within this
        assert wait_until(lambda: not alive(pid))  # killed, not left frozen
        assert other.call(echo, 1) == 1
        assert t.call(os.getpid) != pid
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        t.close()
        other.close()


def test_keepalive_keeps_quiet_healthy_tunnels():
    """Long calls and idle periods are not mistaken for a dead link: the agent
    answers pings while its workers are busy."""
    t = Local('quiet', keepalive=0.5)
    try:
        pid = t.remote_info['pid']
        assert t.call(sleep_then, 1.5, 'slept') == 'slept'
        time.sleep(1.0)
        assert t.call(os.getpid) == pid
    finally:
        t.close()


class StallingLink(object):
    """An ssh_config alias 'stalling' that reaches host1 through slowlink.py,
    a ProxyCommand that forwards bytes until told to stall (SIGUSR1): then it
    holds them, closing nothing, like a partitioned network."""

    def __init__(self, sshd, directory):
        text = open(sshd.ssh_config).read()
        block = text.split('Host host1\n', 1)[1].split('\nHost ', 1)[0]
        self.pids = directory / 'proxy-pids'
        proxy = ("sh -c 'echo $$ >> %s; exec %s %s --delay-ms 1 \"$0\" \"$1\"' %%h %%p"
                 % (self.pids, sys.executable, SLOWLINK))
        self.config = directory / 'stalling.config'
        self.config.write_text('Host stalling\n%s\n    ProxyCommand %s\n' % (block.rstrip(), proxy))

    def proxies(self):
        """The slowlink processes still running."""
        found = []
        if self.pids.exists():
            for pid in {int(p) for p in self.pids.read_text().split()}:
                try:
                    if 'slowlink' in open('/proc/%d/cmdline' % pid).read() and alive(pid):
                        found.append(pid)
                except OSError:
                    pass
        return found

    def stall(self):
        [pid] = self.proxies()
        os.kill(pid, signal.SIGUSR1)

    def cleanup(self):
        for pid in self.proxies():  # a stalled slowlink never exits by itself
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def stalling_link(sshd, tmp_path):
    if not os.path.exists(SLOWLINK):
        pytest.skip('slowlink.py not found at %s' % SLOWLINK)
    link = StallingLink(sshd, tmp_path)
    yield link
    link.cleanup()


def test_keepalive_detects_a_stalled_link(stalling_link, ssh_transport):
    keepalive = 1.0
    t = Tunnel('stalling', ssh_config=str(stalling_link.config), transport=ssh_transport,
               keepalive=keepalive)
    bystander = Tunnel('host2', transport=ssh_transport)
    try:
        assert t.call(echo, 'through the proxy') == 'through the proxy'
        bystander.connect()
        pending = t.call_async(sleep_then, 60, 'never')
        stalled_at = time.monotonic()
        stalling_link.stall()
        exc = failure_of(pending)
        assert isinstance(exc, TunnelClosed)
        assert '[stalling]' in str(exc)
        assert 'keepalive' in str(exc) or 'not responding' in str(exc)
        # detected within the keepalive interval (a ping at K/2, lost at K), plus slack
        assert time.monotonic() - stalled_at < keepalive + 2
        assert bystander.call(echo, 'unaffected') == 'unaffected'
        # a new proxy (and a new link) on next use
        assert t.call(echo, 'reconnected') == 'reconnected'
    finally:
        t.close()
        bystander.close()


def test_calls_with_timeouts_fail_on_time_on_a_stalled_link(stalling_link, ssh_transport):
    t = Tunnel('stalling', ssh_config=str(stalling_link.config), transport=ssh_transport)
    try:
        assert t.call(echo, 1) == 1  # no keepalive
        stalling_link.stall()
        start = time.monotonic()
        with pytest.raises(CallTimeout, match=r'\[stalling\].*within 1'):
            t.call(echo, 2, timeout=1)
        assert time.monotonic() - start < 3
        iterator = t.call_iter(echo, [1, 2, 3], timeout=1)
        with pytest.raises(CallTimeout, match=r'\[stalling\]'):
            next(iterator)
    finally:
        t.close()


def test_openssh_gets_server_alive_from_keepalive(sshd):
    argv = Tunnel('host1', keepalive=2.5).argv()
    assert 'ServerAliveInterval=3' in argv
    argv = Tunnel('host1', keepalive=2, ServerAliveInterval=7).argv()
    assert 'ServerAliveInterval=7' in argv and 'ServerAliveInterval=2' not in argv


def test_server_alive_set_in_ssh_config_is_kept_without_keepalive(sshd, tmp_path):
    # What ssh will use, as ssh -G resolves it from our command line.
    config = tmp_path / 'ssh_config'
    config.write_text('ServerAliveInterval 7\nServerAliveCountMax 9\nInclude %s\n' % sshd.ssh_config)

    def effective(tunnel):
        argv = tunnel.argv()
        argv = argv[:argv.index('--')] + ['-G', 'host1']
        lines = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()
        return dict(line.split(' ', 1) for line in lines if line.startswith('serveralive'))

    assert effective(Tunnel('host1', ssh_config=str(config))) == \
        {'serveraliveinterval': '7', 'serveralivecountmax': '9'}
    assert effective(Tunnel('host1', ssh_config=str(config), keepalive=3))['serveraliveinterval'] == '3'
    assert effective(Tunnel('host1')) == {'serveraliveinterval': '15', 'serveralivecountmax': '3'}


# --- sshd restarted or down ------------------------------------------------------------------

def test_idle_tunnels_survive_an_sshd_restart(sshd, ssh_transport):
    """OpenSSH keeps established sessions across a restart of the listening
    daemon: idle tunnels carry on with the same agent, new ones connect."""
    t = Tunnel('host1', transport=ssh_transport)
    try:
        pid = t.call(os.getpid)
        sshd.restart()
        assert t.call(os.getpid) == pid
        with Tunnel('host2', transport=ssh_transport) as fresh:
            assert fresh.call(echo, 'new') == 'new'
    finally:
        t.close()


def test_sshd_down_refuses_new_tunnels_clearly(sshd, ssh_transport):
    t = Tunnel('host1', transport=ssh_transport)
    try:
        pid = t.call(os.getpid)
        sshd.stop_daemon()
        try:
            assert t.call(os.getpid) == pid  # the open session still works
            with pytest.raises(ConnectError) as info:
                Tunnel('host3', transport=ssh_transport, connect_timeout=10).call(echo, 1)
            message = str(info.value)
            assert message.startswith('[host3] could not connect')
            assert 'refused' in message.lower() or 'unable to connect' in message.lower()
            t.close()
            with pytest.raises(ConnectError, match=r'\[host1\]'):
                t.call(echo, 1)  # reconnecting fails the same clear way
        finally:
            sshd.start_daemon()
        assert t.call(echo, 'back') == 'back'
    finally:
        t.close()


# --- cannot connect --------------------------------------------------------------------------

def closed_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_closed_port(sshd, ssh_transport):
    with pytest.raises(ConnectError) as info:
        Tunnel('host1', port=closed_port(), transport=ssh_transport).call(echo, 1)
    message = str(info.value)
    assert message.startswith('[host1] could not connect')
    assert 'refused' in message.lower() or 'unable to connect' in message.lower()


def test_unroutable_host_fails_within_the_connect_timeout(sshd, ssh_transport):
    start = time.monotonic()
    with pytest.raises(ConnectError) as info:
        Tunnel('192.0.2.1', transport=ssh_transport, connect_timeout=2).call(echo, 1)
    assert '[192.0.2.1]' in str(info.value)
    assert time.monotonic() - start < 2 + 10


def test_wrong_key(sshd, ssh_transport, tmp_path):
    key = tmp_path / 'wrong_key'
    subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(key)], check=True)
    config = tmp_path / 'ssh_config'
    config.write_text(open(sshd.ssh_config).read().replace(sshd.client_key, str(key)))
    with pytest.raises(ConnectError) as info:
        Tunnel('host1', ssh_config=str(config), transport=ssh_transport,
               connect_timeout=20).call(echo, 1)
    message = str(info.value)
    assert message.startswith('[host1] could not connect')
    assert 'permission denied' in message.lower() or 'authentication' in message.lower()


# --- the host's disk or permissions ----------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs, mounted for this test (root only)."""
    mount = tmp_path / 'tiny'
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    out = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip('cannot mount a tmpfs here: %s' % out.stderr.strip())
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=True)


def test_disk_full_during_put_over_ssh(ssh_transport, tiny_fs, tmp_path):
    from chopsticks.files import TransferError
    src = tmp_path / 'big'
    write_file(src, 4 << 20)
    (tiny_fs / 'f').write_bytes(b'old')
    with Tunnel('host1', transport=ssh_transport) as t:
        with pytest.raises(TransferError) as info:
            t.put(str(src), str(tiny_fs / 'f'))
        message = str(info.value)
        assert message.startswith('[host1] put') and str(tiny_fs / 'f') in message
        assert 'disk space' in message or 'No space' in message
        assert (tiny_fs / 'f').read_bytes() == b'old'
        assert os.listdir(str(tiny_fs)) == ['f']  # no temp file left behind
        assert t.call(echo, 'still usable') == 'still usable'


@pytest.mark.parametrize('where', ['unreadable parent', 'root-only directory'])
def test_permission_denied_on_put(sudo_user, where):
    """The host user may not write there: EACCES named as such (not 'missing')."""
    from chopsticks import Sudo
    from chopsticks.files import TransferError
    base = tempfile.mkdtemp(prefix='chopsticks-perm-')
    try:
        os.chmod(base, 0o700 if where == 'unreadable parent' else 0o755)
        locked = os.path.join(base, 'root-only')
        os.mkdir(locked, 0o700)
        src = os.path.join(base, 'src')
        with open(src, 'wb') as f:
            f.write(b'data')
        with Sudo(sudo_user) as t:
            with pytest.raises(TransferError) as info:
                t.put(src, os.path.join(locked, 'f'))
            e = info.value
            assert e.host == t.host and str(e).startswith('[%s] put' % t.host)
            assert e.errno == errno.EACCES and 'permission denied' in str(e).lower()
            assert os.listdir(locked) == []
            assert t.call(echo, 1) == 1
    finally:
        shutil.rmtree(base)


def test_a_transport_process_leads_its_own_group_in_the_controllers_session(sshd):
    """ssh (like sudo, docker or a local python) runs in a process group of
    its own: Ctrl-C at the terminal reaches the controller only, which closes
    its tunnels, and a kill ends ssh with whatever it started.  It stays in
    the controller's session: Linux makes each session a scheduling group
    (autogroup), and a group per ssh process slowed a 48-host fan-out by a
    tenth (see _OWN_PROCESS_GROUP)."""
    with Tunnel('host1') as tunnel:
        tunnel.call(echo, 1)
        ssh = tunnel._conn.transport.proc.pid
        assert os.getpgid(ssh) == ssh
        assert os.getpgid(ssh) != os.getpgid(0)
        if sys.version_info >= (3, 11):
            assert os.getsid(ssh) == os.getsid(0)


# --- the controller interrupted ----------------------------------------------------------------

CONTROLLER = '''
import os, signal, sys, time
# Ctrl-C raises KeyboardInterrupt even when whatever started the test suite
# left SIGINT ignored (a background job of a non-interactive shell does).
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path[:0] = [{repo!r}, {tests!r}]
from chopsticks import Local, Tunnel
from chopsticks.group import Group


def work(seconds):
    import time
    time.sleep(seconds)


hosts = {hosts!r}
group = Group([Local('local%d' % n) if h == 'local' else Tunnel(h) for n, h in enumerate(hosts)])
pids = sorted(info['pid'] for _, info in group.connect().successful())
print(' '.join(map(str, pids)), flush=True)
group.call(work, 60)
print('finished', flush=True)
'''


@pytest.mark.parametrize('hosts', [['local'] * 4, ['host1', 'host2', 'host3', 'local']],
                         ids=['local', 'sshd'])
@pytest.mark.parametrize('how', [signal.SIGINT, signal.SIGKILL], ids=['SIGINT', 'SIGKILL'])
def test_interrupted_controller_leaves_no_remote_pythons(sshd, hosts, how):
    """Ctrl-C (or kill -9) of the controller during a group call: every
    agent exits, whether local or behind sshd, and the controller does not
    hang on its way out."""
    script = CONTROLLER.format(repo=REPO, tests=TESTS, hosts=hosts)
    proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline().decode()
        pids = [int(p) for p in line.split()]
        assert len(pids) == len(hosts), proc.stderr.read().decode()[-2000:]
        assert all(alive(pid) for pid in pids)
        time.sleep(0.5)  # the group call is running on every host
        proc.send_signal(how)
        proc.wait(20)
        assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10), \
            [(pid, state_of(pid)) for pid in pids if alive(pid)]
        if how == signal.SIGINT:
            assert b'KeyboardInterrupt' in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(120)
def test_ctrl_c_while_a_put_waits_for_the_pipe_leaves_the_tunnel_usable(tmp_path):
    """A real SIGINT while a put's frame is half written (the host stopped
    reading: the write waits for the pipe).  The stream cannot go on from
    the middle of a frame, so the connection ends and the next call makes a
    new one.  Before, the next call hung, the host reading garbage; and here,
    the host still stopped, the put's own abort message waited for the pipe
    forever, Ctrl-C or not."""
    src = tmp_path / 'big'
    src.write_bytes(os.urandom(32 << 20))
    main = threading.get_ident()
    with Local('interrupted') as t:
        pid = t.call(os.getpid)
        moving = threading.Event()

        def interrupt():
            moving.wait(30)
            os.kill(pid, signal.SIGSTOP)  # the write now waits, partway through a frame
            time.sleep(0.5)
            signal.pthread_kill(main, signal.SIGINT)
        interrupter = threading.Thread(target=interrupt, daemon=True)
        interrupter.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                t.put(str(src), str(tmp_path / 'dest'), progress=lambda done, total: moving.set())
        finally:
            interrupter.join(30)
            os.kill(pid, signal.SIGCONT)
        assert t.call(sum, [1, 2], timeout=30) == 3
        assert t.call(os.getpid) != pid  # a new connection

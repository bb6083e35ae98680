"""A hostile or broken remote cannot read the controller's files, run code
there, exhaust its memory or starve its other tunnels; host keys are checked."""
import os
import subprocess
import sys
import time
import zlib

import pytest

from chopsticks import ConnectError, Local, RemoteException, Tunnel, codec
from chopsticks.modserver import ModuleServer
from remote_helpers import echo, fail, sys_path

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


# --- output floods ---------------------------------------------------------------------

FLOOD_SCRIPT = '''
import os, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
from chopsticks import Local


def flood(megabytes, how):
    import os, subprocess
    block = (b'x' * 999 + b'\\n') * 1024
    if how == 'child':  # a child process writing to its inherited stdout
        subprocess.run('yes %s | head -c %d' % ('x' * 999, megabytes << 20), shell=True)
    else:
        for _ in range(megabytes):
            os.write(1 if how == 'stdout' else 2, block)
    return 'flooded'


def high_water():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM'):
                return int(line.split()[1]) << 10


flooder, quiet = Local('flooder'), Local('quiet')
flooder.connect()
quiet.connect()
base = high_water()
done = flooder.call_async(flood, {megabytes}, {how!r})
slowest = calls = 0
while not done.done():
    start = time.monotonic()
    quiet.call(os.getpid, timeout=20)
    slowest = max(slowest, time.monotonic() - start)
    calls += 1
    time.sleep(0.01)
print(done.result(), calls, round(slowest, 3), (high_water() - base) >> 20, flush=True)
'''


def run_flood(megabytes, how, stderr_blocked):
    script = FLOOD_SCRIPT.format(repo=REPO, tests=TESTS, megabytes=megabytes, how=how)
    proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if stderr_blocked else subprocess.DEVNULL)
    try:
        # While we wait here, nobody reads the controller's stderr: its pipe is full.
        line = proc.stdout.readline().decode()
        err = proc.stderr.read().decode('utf-8', 'replace') if stderr_blocked else ''
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and line, err[-3000:]
    result, calls, slowest, grown_mb = line.split()
    return result, int(calls), float(slowest), int(grown_mb), err


@pytest.mark.parametrize('how', ['stderr', 'stdout', 'child'])
def test_flood_with_blocked_controller_stderr_does_not_starve_other_tunnels(how):
    """200 MB of remote output while the controller's stderr is a pipe nobody
    reads: the other tunnel keeps answering, memory stays flat, and the
    dropped lines are reported once stderr moves again."""
    megabytes = 200 if how == 'stderr' else 50
    result, calls, slowest, grown_mb, err = run_flood(megabytes, how, stderr_blocked=True)
    assert result == 'flooded'
    assert calls >= 1
    assert grown_mb < 100
    assert '[flooder] chopsticks:' in err and 'lines of output dropped' in err
    assert '[flooder] xxxxxxxx' in err  # what fitted in the buffer was shown


def test_flood_with_fast_controller_stderr_keeps_memory_flat():
    result, calls, slowest, grown_mb, _ = run_flood(200, 'stderr', stderr_blocked=False)
    assert result == 'flooded' and calls >= 1
    assert grown_mb < 100


def test_endless_line_is_shown_in_pieces(capfd):
    """A remote writing one line without a newline cannot grow a buffer without bound."""
    def no_newline():
        import os
        for _ in range(64):
            os.write(2, b'y' * (1 << 20))
        return True
    with Local('oneline') as t:
        assert t.call(no_newline)
        assert t.call(echo, 'still here') == 'still here'
        assert len(t._conn.output.partial) <= 1 << 20
        assert len(t._conn.output.tail) <= 64 * 1024


def test_log_flood_is_relayed_off_the_broker_thread(caplog):
    import logging

    def log_many(n):
        import logging
        log = logging.getLogger('flood.remote')
        for i in range(n):
            log.warning('record %d', i)
        return n
    with Local('logger') as t, caplog.at_level(logging.WARNING):
        assert t.call(log_many, 2000) == 2000
        assert t.call(echo, 1) == 1


# --- the import server, attacked through the real protocol -----------------------------

# Lambdas, so they travel as source: a module-level function here would make
# the remote import this test module (and pytest).
ask_controller = lambda query: __import__('sys').modules['_chopsticks_agent'].agent.request(query)  # noqa: E731
import_module = lambda name: __import__('importlib').import_module(name).__name__  # noqa: E731


@pytest.fixture
def controller_path(tmp_path, monkeypatch):
    """A directory on the controller's sys.path with one package, and secrets nearby."""
    root = tmp_path / 'on_sys_path'
    # The user shares this package's files (data) with hosts: see ServePolicy.
    monkeypatch.setenv('CHOPSTICKS_SERVE', 'victimpkg,*')
    pkg = root / 'victimpkg'
    (pkg / 'data').mkdir(parents=True)
    (pkg / '__init__.py').write_text('VALUE = 1\n')
    (pkg / 'data' / 'ok.txt').write_text('fine to read')
    secret = tmp_path / 'secret.txt'
    secret.write_text('TOP SECRET')
    # a plain directory (no __init__.py) that happens to sit on sys.path
    (root / 'private').mkdir()
    (root / 'private' / 'credentials.txt').write_text('PRIVATE KEY')
    # links out of the package and out of sys.path
    os.symlink(secret, pkg / 'data' / 'link_out.txt')
    os.symlink(tmp_path, pkg / 'data' / 'dir_out')
    os.symlink(secret, root / 'linked_module.py')
    outside = tmp_path / 'outside_pkg'
    outside.mkdir()
    (outside / '__init__.py').write_text('SECRET = "outside"\n')
    os.symlink(outside, root / 'linked_pkg')
    monkeypatch.syspath_prepend(str(root))
    for name in [n for n in sys.modules if n.startswith(('victimpkg', 'private', 'linked_'))]:
        del sys.modules[name]
    return root, pkg, secret


def refused(reply):
    return isinstance(reply, dict) and 'data' not in reply and not reply.get('modules') \
        and bool(reply.get('error') or reply.get('errors') or reply.get('missing'))


def test_served_package_data_is_readable(controller_path):
    root, pkg, _ = controller_path
    with Local() as t:
        assert t.call(import_module, 'victimpkg') == 'victimpkg'
        assert t.call(ask_controller, ('data', str(pkg / 'data' / 'ok.txt'))) == \
            {'data': b'fine to read'}


def test_hostile_data_requests_are_refused(controller_path):
    root, pkg, secret = controller_path
    home = os.path.expanduser('~')
    paths = [
        str(secret),                                         # absolute, outside
        str(pkg / 'data' / '..' / '..' / '..' / 'secret.txt'),  # .. out of the package
        str(pkg) + '/../../secret.txt',
        str(pkg / 'data' / 'link_out.txt'),                  # symlink to a file outside
        str(pkg / 'data' / 'dir_out' / 'secret.txt'),        # through a symlinked directory
        str(root / 'private' / 'credentials.txt'),           # on sys.path, not in a package
        os.path.join(home, '.ssh', 'id_rsa'),
        os.path.join(home, '.ssh', 'authorized_keys'),
        '~/.ssh/id_rsa',
        '/etc/shadow',
        '/proc/self/environ',
        str(pkg / 'data' / 'ok.txt') + '\0/etc/passwd',
        str(pkg / 'data'),                                   # a directory
        'data/ok.txt',                                       # relative
    ]
    with Local() as t:
        t.call(import_module, 'victimpkg')  # the package is served: its data is fair game
        for path in paths:
            reply = t.call(ask_controller, ('data', path))
            assert refused(reply), (path, reply)
        assert t.call(echo, 'still fine') == 'still fine'


def test_hostile_module_requests_are_refused(controller_path):
    with Local() as t:
        for name in ['linked_module', 'linked_pkg', '../secret', '.ssh', 'os/../../etc/passwd',
                     '/etc/passwd', '', 'a..b', 'victimpkg.__init__\0x']:
            reply = t.call(ask_controller, ('module', name))
            assert refused(reply), (name, reply)
        for query in [('list', '/'), ('data', 3), ('module', None), 'module', ('module',),
                      ('module', 'a', 'b'), {'module': 'os'}, None]:
            reply = t.call(ask_controller, query)
            assert refused(reply), (query, reply)
        assert t.call(echo, 1) == 1


def test_plain_directory_on_sys_path_does_not_open_its_files(controller_path):
    """Any directory on sys.path imports as a namespace package; that must not
    make the files under it readable by the remote."""
    root, _, _ = controller_path
    with Local() as t:
        t.call(ask_controller, ('module', 'private'))
        reply = t.call(ask_controller, ('data', str(root / 'private' / 'credentials.txt')))
        assert refused(reply), reply


def test_module_server_direct(controller_path):
    """The same refusals without a remote, including a zip archive on sys.path."""
    root, pkg, secret = controller_path
    server = ModuleServer()

    def ask(query):
        return codec.decode(zlib.decompress(server.handle(query)))
    assert ask(('module', 'victimpkg'))['modules']
    assert refused(ask(('module', 'linked_module')))
    assert 'outside sys.path' in ask(('module', 'linked_module'))['errors']['linked_module']
    assert refused(ask(('data', str(pkg / 'data' / 'link_out.txt'))))


# --- host keys -------------------------------------------------------------------------

def config_with_known_hosts(sshd, tmp_path, known_hosts_line):
    known = tmp_path / 'known_hosts'
    known.write_text(known_hosts_line)
    config = tmp_path / 'ssh_config'
    config.write_text(open(sshd.ssh_config).read().replace(sshd.known_hosts, str(known)))
    return str(config)


@pytest.mark.parametrize('transport', ['openssh', 'paramiko'])
def test_changed_host_key_is_refused(sshd, tmp_path, transport):
    """known_hosts holds another key for the host: a man in the middle, or a
    reinstalled host.  Both transports refuse; neither updates known_hosts."""
    other = tmp_path / 'other_key'
    subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(other)], check=True)
    key_type, blob = open(str(other) + '.pub').read().split()[:2]
    line = '[127.0.0.1]:%d %s %s\n' % (sshd.port, key_type, blob)
    config = config_with_known_hosts(sshd, tmp_path, line)
    with pytest.raises(ConnectError) as info:
        Tunnel('host1', ssh_config=config, transport=transport, connect_timeout=20).call(echo, 1)
    message = str(info.value)
    assert '[host1]' in message
    assert 'host key' in message.lower() or 'identification has changed' in message.lower()
    assert open(tmp_path / 'known_hosts').read() == line  # not silently replaced


@pytest.mark.parametrize('transport', ['openssh', 'paramiko'])
def test_host_key_checking_is_on_without_any_config(sshd, tmp_path, transport):
    """No StrictHostKeyChecking in the config at all: still refused (the
    OpenSSH default would be 'ask', which BatchMode turns into a refusal;
    paramiko would be AutoAddPolicy under Fabric)."""
    text = open(sshd.ssh_config).read()
    text = text.replace(sshd.known_hosts, str(tmp_path / 'empty_known_hosts'))
    text = '\n'.join(line for line in text.splitlines()
                     if 'StrictHostKeyChecking' not in line) + '\n'
    (tmp_path / 'empty_known_hosts').write_text('')
    config = tmp_path / 'ssh_config'
    config.write_text(text)
    with pytest.raises(ConnectError) as info:
        Tunnel('host1', ssh_config=str(config), transport=transport, connect_timeout=20).call(echo, 1)
    assert '[host1]' in str(info.value)
    assert (tmp_path / 'empty_known_hosts').read_text() == ''


# --- a remote that stops reading, then misbehaves ----------------------------------------

def test_remote_that_stops_reading_and_misbehaves_cannot_stall_the_controller():
    """The controller is stuck writing a large call to a host that no longer
    reads when that host sends garbage: the tunnel is closed (the stuck write
    fails instead of waiting forever) and other tunnels never stall."""
    import threading
    from chopsticks import TunnelClosed

    def go_deaf_then_send_garbage(delay):
        """Stop reading the controller's frames, keeping the pipe open so its
        writes block rather than fail; later send bytes that are not protocol."""
        import os
        import sys
        import threading
        import time
        agent = sys.modules['_chopsticks_agent'].agent
        agent.kept_open = os.dup(agent.rfd)
        never, _ = os.pipe()
        os.dup2(never, agent.rfd)  # the reader's next read waits forever

        def garbage():
            time.sleep(delay)
            with agent.channel.lock:
                os.write(agent.channel.fd, b'\xff' * 64)
        threading.Thread(target=garbage).start()
        return 'deaf'

    hostile, other = Local('deaf'), Local('other')
    try:
        other.connect()
        assert hostile.call(go_deaf_then_send_garbage, 1.5) == 'deaf'
        outcome = {}

        def stuck_call():
            try:
                hostile.call(len, b'x' * (8 << 20))  # blocks: nobody reads the pipe
            except Exception as e:
                outcome['error'] = e
        writer = threading.Thread(target=stuck_call)
        writer.start()
        for n in range(30):  # the broker keeps serving everyone else meanwhile
            assert other.call(echo, n, timeout=10) == n
        writer.join(20)
        assert not writer.is_alive(), 'the stuck write was never released'
        error = outcome['error']
        assert isinstance(error, TunnelClosed) and '[deaf]' in str(error), repr(error)
        assert 'invalid data' in str(error)
        assert hostile.call(echo, 'reconnected') == 'reconnected'
    finally:
        hostile.close()
        other.close()


# --- what lies in the working directory --------------------------------------------------

def test_a_module_in_the_working_directory_does_not_run_in_the_agent(tmp_path, monkeypatch):
    """``python -c`` puts the working directory first on sys.path; the agent
    takes it off, or a traceback.py there would run as the tunnel's user
    (root, for a Sudo tunnel started from a directory others may write to)."""
    marker = tmp_path / 'ran'
    (tmp_path / 'traceback.py').write_text(
        'open(%r, "w").write("ran")\n'
        'def format_exception(*args, **kwargs):\n'
        '    return ["shadowed"]\n' % str(marker))
    monkeypatch.chdir(tmp_path)
    with Local() as t:
        assert '' not in t.call(sys_path)
        with pytest.raises(RemoteException) as info:
            t.call(fail, 'the real traceback')  # the agent imports traceback for it
    assert not marker.exists()
    assert 'shadowed' not in info.value.remote_traceback
    assert 'the real traceback' in info.value.remote_traceback


def test_a_host_that_stops_reading_cannot_starve_other_tunnels_imports(tmp_path, monkeypatch):
    """The import pool's few threads serve every tunnel.  A host that stops
    reading its stdin and then asks for several big closures used to hold
    every pool thread in a write to its full pipe, and another tunnel's
    import waited until the attacker was closed."""
    (tmp_path / 'starved_probe.py').write_text('def answer():\n    return 42\n')
    monkeypatch.syspath_prepend(str(tmp_path))

    def go_deaf_and_ask(count):
        import os
        import sys
        module = sys.modules['_chopsticks_agent']
        agent = module.agent
        agent.kept_open = os.dup(agent.rfd)
        never, _ = os.pipe()
        os.dup2(never, agent.rfd)  # the controller's replies are never read
        for n in range(count):  # each reply is megabytes: far more than a pipe holds
            agent.channel.send_value(10 ** 6 + n, module.wire.IMPORT, ('closure', 'fabric'))
        return 'deaf'

    hostile, honest = Local('deaf'), Local('honest')
    try:
        assert hostile.call(go_deaf_and_ask, 8) == 'deaf'
        time.sleep(1)  # let the pool take the requests (the bug needs no more)
        # Imported on the host, so the host asks for it (a call's own module
        # would go ahead of the call, without the pool).
        assert honest.call(lambda: __import__('starved_probe').answer(), timeout=30) == 42
    finally:
        hostile.close()
        honest.close()

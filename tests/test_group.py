"""Groups over real tunnels: Local subprocesses and a loopback sshd.

A dead host (a closed port, an unresolvable name) is mixed in wherever it
matters: it must turn into an ErrorResult while the others succeed.
"""
import os
import socket
import sys
import threading
import time

import pytest

from chopsticks import CallTimeout, ConnectError, Local, RemoteException
from chopsticks import dispatch, operations
from chopsticks.group import ErrorResult, Group, GroupFailures, GroupResult
from remote_helpers import echo, fail


@pytest.fixture
def locals4():
    tunnels = [Local('local%d' % i) for i in range(4)]
    yield tunnels
    for t in tunnels:
        t.close()


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that refuses connections (bound, never listening)."""
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def ssh_config_with_dead_host(sshd, closed_port, tmp_path, monkeypatch):
    """The sshd's ssh_config plus ``deadhost``, an alias to a closed port."""
    with open(sshd.ssh_config) as f:
        text = f.read()
    path = tmp_path / 'ssh_config'
    path.write_text(text + '\nHost deadhost\n    HostName 127.0.0.1\n    Port %d\n'
                           '    BatchMode yes\n    ConnectTimeout 5\n' % closed_port)
    monkeypatch.setenv('CHOPSTICKS_SSH_CONFIG', str(path))
    return str(path)


def set_role(role):
    """A remote function setting an environment variable in the agent."""
    return lambda: os.environ.update(CHOPSTICKS_TEST_ROLE=role)


# --- results ---------------------------------------------------------------------------

def test_call_returns_a_result_per_host_in_group_order(locals4):
    group = Group(locals4)
    result = group.call(os.getpid)
    assert isinstance(result, GroupResult)
    assert list(result) == ['local0', 'local1', 'local2', 'local3']
    assert result == {t.host: t.remote_info['pid'] for t in locals4}
    assert dict(result.successful()) == result
    assert list(result.failures()) == []
    assert result.raise_failures() is result


def test_remote_exception_becomes_an_error_result(locals4):
    result = Group(locals4[:2]).call(fail, 'nope')
    assert not list(result.successful())
    err = result['local0']
    assert isinstance(err, ErrorResult)
    assert err.host == 'local0'
    assert err.msg == "KeyError: 'nope'"
    assert 'in fail' in err.remote_traceback and err.tb == err.remote_traceback
    assert isinstance(err.exception, RemoteException) and err.exception.type_name == 'KeyError'
    with pytest.raises(GroupFailures) as info:
        result.raise_failures()
    assert isinstance(info.value, RemoteException)  # as chopsticks 1.x raised
    assert set(info.value.failures) == {'local0', 'local1'}
    text = str(info.value)
    assert '2 of 2 hosts failed' in text and "[local1] KeyError: 'nope'" in text


def test_dead_hosts_fail_alone_over_ssh(ssh_config_with_dead_host):
    group = Group(['host1', 'deadhost', 'host2', 'nonexistent.invalid', 'host3'])
    try:
        result = group.call(echo, 'hi')
        assert dict(result.successful()) == {'host1': 'hi', 'host2': 'hi', 'host3': 'hi'}
        failures = dict(result.failures())
        assert set(failures) == {'deadhost', 'nonexistent.invalid'}
        assert 'could not connect' in failures['deadhost'].msg
        assert 'Connection refused' in failures['deadhost'].msg
        assert 'Could not resolve hostname' in failures['nonexistent.invalid'].msg
        assert isinstance(failures['deadhost'].exception, ConnectError)
        assert failures['deadhost'].remote_traceback is None

        # A failed host is remembered: the next call reports it at once...
        again = group.call(echo, 'again')
        assert again['deadhost'].exception is failures['deadhost'].exception
        assert again['host1'] == 'again'
        # ...until connect() tries it again.
        connected = group.connect()
        assert isinstance(connected['deadhost'], ErrorResult)
        assert connected['deadhost'].exception is not failures['deadhost'].exception
        assert connected['host2']['pid'] > 0
    finally:
        group.close()


def test_a_wake_up_after_the_run_writes_nowhere():
    """Events can reach a run that is over: a transfer whose timeout ended
    the run finishes later, a run interrupted by ^C leaves connects going.
    Their wake-up must not write to the fd number the run's pipe had: once
    closed, it belongs to whatever file is opened next."""
    reader = dispatch.ReplyReader()
    number = reader.wake_w
    reader.close()
    r, w = os.pipe()
    if w != number:  # our pipe takes the number, as the next file would
        os.dup2(w, number)
        os.close(w)
    try:
        reader.wake()
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 10)  # nothing was written to our pipe
    finally:
        os.close(r)
        os.close(number)


def test_per_host_timeout_leaves_the_others_alone(locals4):
    group = Group(locals4, timeout=30)
    group.call(set_role('slow'))  # everyone, then undo on two of them
    Group(locals4[:2]).call(lambda: os.environ.pop('CHOPSTICKS_TEST_ROLE'))

    def sleep_if_slow():
        if os.environ.get('CHOPSTICKS_TEST_ROLE') == 'slow':
            time.sleep(60)
        return 'quick'

    result = group.call(sleep_if_slow, timeout=1)
    assert dict(result.successful()) == {'local0': 'quick', 'local1': 'quick'}
    for host in ('local2', 'local3'):
        assert isinstance(result[host].exception, CallTimeout)
        assert 'did not finish within 1s' in result[host].msg
    # The abandoned calls do not block new ones.
    assert group.call(echo, 7) == {t.host: 7 for t in locals4}


def test_max_parallel_bounds_hosts_busy_at_once(locals4):
    group = Group(locals4, max_parallel=2)
    group.connect()
    spans = group.call(lambda: (time.time(), time.sleep(0.3), time.time()))
    intervals = [(start, end) for start, _, end in spans.values()]
    for start, _ in intervals:
        assert sum(s <= start < e for s, e in intervals) <= 2


def test_call_is_pickled_once_for_all_hosts(locals4, monkeypatch):
    calls = []
    real = operations.dumps_call
    monkeypatch.setattr(operations, 'dumps_call', lambda *a: calls.append(a) or real(*a))
    from chopsticks import connection
    per_tunnel = []
    real_conn = connection.dumps_call
    monkeypatch.setattr(connection, 'dumps_call', lambda *a: per_tunnel.append(a) or real_conn(*a))
    group = Group(locals4)
    group.connect()
    assert group.call(echo, b'x' * 1000) == {t.host: b'x' * 1000 for t in locals4}
    assert len(calls) == 1 and per_tunnel == []


def test_a_group_call_goes_out_with_each_connect(monkeypatch):
    """On tunnels not connected yet, each host's call goes right behind its
    agent, before the agent's HELLO is back: one round trip less per host."""
    from chopsticks import wire
    from chopsticks.connection import Connection
    events = {}
    send, dispatch = Connection.request, Connection.dispatch

    def recording_send(self, op, handler, payload):
        events.setdefault(self.host, []).append('call sent')
        return send(self, op, handler, payload)

    def recording_dispatch(self, rid, op, payload):
        if op == wire.HELLO:
            events.setdefault(self.host, []).append('hello received')
        return dispatch(self, rid, op, payload)

    monkeypatch.setattr(Connection, 'request', recording_send)
    monkeypatch.setattr(Connection, 'dispatch', recording_dispatch)
    tunnels = [Local('first%d' % i) for i in range(3)]
    try:
        result = Group(tunnels).call(os.getpid)
        assert result == {t.host: t.remote_info['pid'] for t in tunnels}
    finally:
        for t in tunnels:
            t.close()
    assert {host: order[:2] for host, order in events.items()} == \
        {t.host: ['call sent', 'hello received'] for t in tunnels}


def test_one_pickle_serves_every_remote_python(pythons):
    tunnels = [Local('py%d' % i, python=p) for i, p in enumerate(pythons)]
    group = Group(tunnels)
    try:
        versions = group.call(lambda n: (sys.version_info[:2], n * 2), 21).raise_failures()
        assert [v[1] for v in versions.values()] == [42] * len(pythons)
        assert len({tuple(v[0]) for v in versions.values()}) == len(pythons)
    finally:
        group.close()


def test_unpicklable_call_raises_before_contacting_anyone(locals4):
    group = Group(locals4)
    with pytest.raises(Exception) as info:
        group.call(echo, threading.Lock())
    assert 'lock' in str(info.value).lower()
    assert not any(t.connected for t in locals4)


def test_no_threads_for_calls_on_connected_tunnels(locals4):
    group = Group(locals4)
    group.connect()
    group.call(echo, 0)  # the hosts import echo's module: the import pool's threads start
    before = set(threading.enumerate())
    group.call(echo, 1)
    assert set(threading.enumerate()) <= before


def test_calls_from_other_threads_finish_during_a_group_call(locals4):
    """The thread running a group call reads its tunnels' replies itself:
    replies to another thread's calls on those tunnels must reach it too."""
    group = Group(locals4)
    group.connect()
    results = []

    def caller():
        for i in range(50):
            results.append(locals4[0].call(echo, i))

    thread = threading.Thread(target=caller)
    thread.start()
    slow = group.call(lambda: time.sleep(0.5) or 'slow')
    thread.join(10)
    assert not thread.is_alive()
    assert results == list(range(50))
    assert slow == {t.host: 'slow' for t in locals4}


def test_async_calls_are_answered_after_a_group_call(locals4):
    """After a group call, the broker reads the tunnels again."""
    group = Group(locals4)
    group.call(echo, 1)
    futures = [t.call_async(echo, t.host) for t in locals4]
    assert [f.result(10) for f in futures] == [t.host for t in locals4]


def test_a_host_lost_during_a_group_call_fails_alone(locals4):
    group = Group(locals4)
    group.connect()
    victim = locals4[1]
    pid = victim.call(os.getpid)

    def die_on_victim(victim_pid):
        if os.getpid() == victim_pid:
            os.kill(os.getpid(), 9)
        time.sleep(0.3)
        return 'alive'

    started = time.monotonic()
    result = group.call(die_on_victim, pid, timeout=30)
    assert time.monotonic() - started < 10
    assert dict(result.successful()) == {t.host: 'alive' for t in locals4 if t is not victim}
    assert 'connection lost' in result[victim.host].msg


def test_empty_group():
    group = Group([])
    assert group.call(os.getpid) == {}
    assert len(group) == 0 and not group


# --- construction, filter and set operations --------------------------------------------

def test_host_strings_become_tunnels():
    from chopsticks.tunnel import SSHTunnel
    group = Group(['local', 'web1', 'web1', Local('builder')])
    assert group.hosts == ['localhost', 'web1', 'builder']
    assert isinstance(group.tunnels[1], SSHTunnel)
    assert isinstance(group.tunnels[0], Local)


def test_two_tunnels_of_one_name_are_refused():
    with pytest.raises(ValueError, match="named 'localhost'"):
        Group([Local(), Local()])


def test_filter_runs_the_predicate_on_each_host(locals4):
    group = Group(locals4)
    Group(locals4[1:3]).call(set_role('web'))
    is_web = lambda: os.environ.get('CHOPSTICKS_TEST_ROLE') == 'web'  # noqa: E731
    web = group.filter(is_web)
    assert isinstance(web, Group) and web.hosts == ['local1', 'local2']
    assert web.tunnels[0] is locals4[1]
    assert group.filter(is_web, exclude=True).hosts == ['local0', 'local3']
    assert web.max_parallel == group.max_parallel


def test_filter_raises_when_a_host_cannot_answer(locals4):
    group = Group(locals4[:2] + ['nonexistent.invalid'])
    with pytest.raises(GroupFailures) as info:
        group.filter(lambda: True)
    assert list(info.value.failures) == ['nonexistent.invalid']


def test_set_operations_compare_hosts_by_name():
    a, b, c, d = (Local(n) for n in 'abcd')
    ab, bc = Group([a, b]), Group([b, c])
    assert (ab | bc).hosts == ['a', 'b', 'c']
    assert (ab + bc).hosts == ['a', 'b', 'c']
    assert (ab & bc).hosts == ['b']
    assert (ab - bc).hosts == ['a']
    assert (ab ^ bc).hosts == ['a', 'c']
    assert ab.union(bc, [d]).hosts == ['a', 'b', 'c', 'd']
    assert ab.intersection(bc).hosts == ['b']
    assert ab.difference(bc).hosts == ['a']
    assert ab.symmetric_difference(bc).hosts == ['a', 'c']
    # By name: another tunnel called 'b' is the same member; the left one is kept.
    other_b = Local('b')
    assert (ab & Group([other_b])).tunnels[0] is b
    assert (ab - Group([other_b])).hosts == ['a']
    assert other_b in ab and 'a' in ab and 'z' not in ab and c not in ab


def test_set_operations_with_tunnels():
    a, b, c = (Local(n) for n in 'abc')
    assert (a | b).hosts == ['a', 'b']
    assert (a + b + c).hosts == ['a', 'b', 'c']
    assert (Group([a, b]) | c).hosts == ['a', 'b', 'c']
    assert (c | Group([a, b])).hosts == ['c', 'a', 'b']
    assert (Group([a, b]) - a).hosts == ['b']
    assert (a - Group([a, b])).hosts == []
    assert (a ^ Group([a, b])).hosts == ['b']
    assert (a & Group([a, b])).hosts == ['a']
    assert list(Group([a, b])) == [a, b] and len(a | b | c) == 3
    with pytest.raises(TypeError):
        Group([a]) | 3


def test_derived_groups_keep_settings_and_remembered_failures(locals4):
    dead = 'nonexistent.invalid'
    group = Group(locals4[:2] + [dead], max_parallel=3, timeout=9, progress=False)
    first = group.call(echo, 1)
    sub = group - locals4[0]
    assert (sub.max_parallel, sub.timeout, sub.progress) == (3, 9, False)
    assert sub.call(echo, 2)[dead].exception is first[dead].exception


def test_context_manager_connects_and_closes(locals4):
    with Group(locals4) as group:
        assert all(t.connected for t in locals4)
        assert group.call(echo, 'x')['local3'] == 'x'
    assert not any(t.connected for t in locals4)


# --- connect storms --------------------------------------------------------------------

@pytest.fixture
def throttled_sshd():
    """A loopback sshd that drops unauthenticated connections past 2 at once."""
    from chopsticks.testing.sshd import LoopbackSSHD, SSHDNotFound
    try:
        server = LoopbackSSHD(aliases=['storm%d' % i for i in range(6)])
    except SSHDNotFound as exc:
        pytest.skip(str(exc))
    # sshd takes the last MaxStartups it reads, so extra_config cannot lower it.
    with open(server.sshd_config) as f:
        text = f.read()
    with open(server.sshd_config, 'w') as f:
        f.write(text.replace('MaxStartups 200', 'MaxStartups 2:100:2'))
    server.restart()
    yield server
    server.stop()


def test_connect_storm_is_throttled_and_retried(throttled_sshd, monkeypatch):
    monkeypatch.setenv('CHOPSTICKS_SSH_CONFIG', throttled_sshd.ssh_config)
    group = Group(throttled_sshd.aliases, max_connect=6)
    try:
        result = group.call(echo, 'up')
        assert dict(result.failures()) == {}
        assert set(result.values()) == {'up'}
    finally:
        group.close()
    # The server did drop connections: the retries are what made it work.
    assert 'past MaxStartups' in throttled_sshd.log_text()


# --- files ------------------------------------------------------------------------------

files = pytest.importorskip('chopsticks.files')
needs_files = pytest.mark.skipif(not hasattr(files, 'put') or not hasattr(files, 'fetch'),
                                 reason='chopsticks.files has no put/fetch yet')


@needs_files
def test_put_and_fetch_with_host_templates(locals4, tmp_path):
    source = tmp_path / 'payload.bin'
    source.write_bytes(os.urandom(300 * 1024))
    group = Group(locals4[:2] + ['nonexistent.invalid'])
    dest = tmp_path / 'remote'
    dest.mkdir()
    # Local tunnels share this filesystem: both hosts write the same file (atomically).
    put = group.put(str(source), str(dest / 'copy.bin'), mode=0o600)
    assert set(h for h, _ in put.successful()) == {'local0', 'local1'}, \
        [getattr(value, 'msg', value) for value in put.values()]
    assert put['local0']['size'] == 300 * 1024
    assert 'could not connect' in put['nonexistent.invalid'].msg
    assert (dest / 'copy.bin').read_bytes() == source.read_bytes()
    assert (dest / 'copy.bin').stat().st_mode & 0o777 == 0o600

    fetched = group.fetch(str(dest / 'copy.bin'), str(tmp_path / 'back' / '{host}' / 'copy.bin'))
    for host in ('local0', 'local1'):
        path = tmp_path / 'back' / host / 'copy.bin'
        assert fetched[host]['local_path'] == str(path)
        assert path.read_bytes() == source.read_bytes()
    assert isinstance(fetched['nonexistent.invalid'], ErrorResult)


@needs_files
def test_fetch_defaults_to_a_temporary_directory_per_host(locals4, tmp_path):
    source = tmp_path / 'hosts.txt'
    source.write_text('127.0.0.1 localhost\n')
    result = Group(locals4[:3]).fetch(str(source)).raise_failures()
    paths = [value['local_path'] for value in result.values()]
    assert len(set(paths)) == 3
    for host, value in result.items():
        assert os.path.basename(os.path.dirname(value['local_path'])) == host
        assert open(value['local_path']).read() == '127.0.0.1 localhost\n'


@needs_files
def test_fetch_never_writes_outside_the_templates_directory(tmp_path):
    """A host named '..' would make 'out/{host}/x' into 'x' beside 'out'; one
    named 'a/../../b' into '../b/x'.  The first is refused, for that host
    alone and naming it; the second stays one path component."""
    source = tmp_path / 'secret.txt'
    source.write_text('data')
    tunnels = [Local('..'), Local('a/../../b'), Local('fine')]
    try:
        result = Group(tunnels).fetch(str(source), str(tmp_path / 'out' / '{host}' / 'x'))
    finally:
        for tunnel in tunnels:
            tunnel.close()
    assert isinstance(result['..'], ErrorResult)
    assert str(result['..']).startswith("[..] ValueError: cannot fetch %s to " % source)
    assert "the host name '..' would put the file outside the template's directory" in result['..'].msg
    assert result['a/../../b']['local_path'] == str(tmp_path / 'out' / 'a_.._.._b' / 'x')
    assert (tmp_path / 'out' / 'fine' / 'x').read_text() == 'data'
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*') if p.is_file())
    assert written == ['out/a_.._.._b/x', 'out/fine/x', 'secret.txt']


def test_fetch_template_must_name_the_host(locals4):
    with pytest.raises(ValueError, match='{host}'):
        Group(locals4[:2]).fetch('/etc/hostname', '/tmp/hostname')


def test_put_of_a_missing_file_fails_at_once(locals4, tmp_path):
    with pytest.raises(FileNotFoundError):
        Group(locals4).put(str(tmp_path / 'missing'))
    assert not any(t.connected for t in locals4)

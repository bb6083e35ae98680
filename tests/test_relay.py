"""Tunnels through tunnels: a relay host opens tunnels and forwards calls and imports."""
import os
import sys
import textwrap

import pytest

from chopsticks import ConnectError, DepthLimitExceeded, Local, RemoteException, Tunnel
from remote_helpers import echo, fail


@pytest.fixture
def relay():
    t = Local('relay')
    yield t
    t.close()


def test_calls_travel_through_the_relay(relay):
    far = Local('far', via=relay)
    try:
        assert far.call(os.getppid) == relay.call(os.getpid)  # the relay started it
        assert far.call(echo, {'b': b'bytes', 't': (1, 2)}) == {'b': b'bytes', 't': (1, 2)}
        assert far.call(lambda s: s[::-1], 'abc') == 'cba'
        assert list(far.call_iter(range, 5)) == [0, 1, 2, 3, 4]
        assert repr(far) == "Local('far', via=Local('relay'))"
    finally:
        far.close()


def test_remote_exception_names_the_far_host(relay):
    far = Local('far', via=relay)
    with pytest.raises(RemoteException) as info:
        far.call(fail, 'deep')
    assert info.value.host == 'far' and info.value.type_name == 'KeyError'
    assert 'in fail' in info.value.remote_traceback


def test_imports_for_far_hosts_are_served_once_through_the_relay(relay, tmp_path, monkeypatch):
    pkg = tmp_path / 'relayedpkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('from . import part\n')
    (pkg / 'part.py').write_text(textwrap.dedent('''
        import os
        def whoami():
            return os.getpid()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop('relayedpkg', None)
    sys.modules.pop('relayedpkg.part', None)
    import relayedpkg.part
    fars = [Local('far%d' % i, via=relay) for i in range(3)]
    try:
        pids = {far.call(relayedpkg.part.whoami) for far in fars}
        assert len(pids) == 3
        # the controller served the package to the relay once, not once per far host
        served = relay._conn.modules.sent
        assert 'relayedpkg' in served and 'relayedpkg.part' in served
        assert relay.call(_forwarded_queries) == [('closure', 'relayedpkg')]
    finally:
        for far in fars:
            far.close()


def _forwarded_queries():
    from chopsticks.modserver import ForwardingModuleServer
    return sorted(q for q in ForwardingModuleServer.cache if q[1].startswith('relayedpkg'))


def test_depth_limit_is_a_clear_error(relay):
    hop2 = Local('hop2', via=relay)
    hop3 = Local('hop3', via=hop2)
    hop4 = Local('hop4', via=hop3)
    assert hop3.call(echo, 3) == 3
    with pytest.raises(DepthLimitExceeded) as info:
        hop4.call(echo, 4)
    assert 'hop4' in str(info.value) and 'limit is 3' in str(info.value)


def test_unreachable_far_host_says_which_and_via_what(sshd, relay):
    far = Tunnel('no-such-host.invalid', ssh_config=sshd.ssh_config, via=relay, connect_timeout=20)
    with pytest.raises(ConnectError) as info:
        far.call(echo, 1)
    text = str(info.value)
    assert 'no-such-host.invalid' in text and 'via relay' in text


def test_ssh_through_ssh(sshd):
    bastion = Tunnel('host1')
    far = Tunnel('host2', ssh_config=sshd.ssh_config, via=bastion)
    try:
        assert far.call(os.getppid) != bastion.call(os.getpid)  # ssh, then sshd, then python
        assert far.call(echo, [1, 'x']) == [1, 'x']
        assert far.call(lambda: 6 * 7) == 42
    finally:
        far.close()
        bastion.close()


def test_group_fans_out_from_a_relay(sshd, relay):
    from chopsticks import Group
    hosts = ['host1', 'host2', 'host3', 'no-such-host.invalid']
    group = Group(['%s?ssh_config=%s' % (h, sshd.ssh_config) for h in hosts[:3]]
                  + ['no-such-host.invalid'], via=relay)
    try:
        results = group.call(os.getppid)
    finally:
        group.close()
    assert set(results) == set(hosts)
    failures = dict(results.failures())
    assert list(failures) == ['no-such-host.invalid']
    assert 'via relay' in failures['no-such-host.invalid'].msg
    assert len({pid for _, pid in results.successful()}) == 3
    # one connection from the controller: the relay
    assert all(t.via is relay for t in group)


def test_a_put_through_the_relay_arrives_whole(relay, tmp_path):
    """put sends a file's bytes from the file (sendfile) to the relay, which
    forwards them to the far host as a stream."""
    src = tmp_path / 'big.bin'
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    far = Local('far', via=relay)
    try:
        result = far.put(str(src), str(tmp_path / 'copy.bin'))
        assert (tmp_path / 'copy.bin').read_bytes() == data
        assert result['size'] == len(data)
    finally:
        far.close()

"""RelayedGroup: one call per relay, each relay running the call on its own hosts."""
import os
import time

import pytest

from chopsticks import ErrorResult, Group, Local, RelayedGroup, Tunnel
from chopsticks import relaygroup
from chopsticks.errors import CallTimeout, ConnectError, ProtocolError, RemoteException
import relay_group_helpers as helpers
from remote_helpers import echo


@pytest.fixture
def relays():
    made = [Local('relay1'), Local('relay2')]
    yield made
    for relay in made:
        relay.close()


def fleet(relays, **kwargs):
    return RelayedGroup({relays[0]: [Local('a'), Local('b')], relays[1]: ['local', Local('c')]},
                        progress=False, **kwargs)


def gone(pid):
    """Whether process ``pid`` has exited (waits for it, up to 20 s)."""
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_one_call_per_relay_reaches_every_far_host_and_keeps_them(relays):
    group = fleet(relays)
    try:
        first = group.call(helpers.pid_and_name)
        assert list(first) == ['a', 'b', 'localhost', 'c']
        assert {host: name for host, (_, name) in first.items()} == {h: h for h in first}
        relay_pids = {relay.host: relay.call(os.getpid) for relay in relays}
        # the far agents are the relays' children, not the controller's
        far_parents = group.call(os.getppid)
        assert far_parents == {'a': relay_pids['relay1'], 'b': relay_pids['relay1'],
                               'localhost': relay_pids['relay2'], 'c': relay_pids['relay2']}
        # a second call goes to the same far agents: no reconnect
        assert group.call(helpers.pid_and_name) == first
        assert group.call(echo, {'b': b'x', 't': (1, 2)})['c'] == {'b': b'x', 't': (1, 2)}
    finally:
        group.close()
    assert all(gone(pid) for pid, _ in first.values())


def test_keyword_arguments_and_lambda_defaults_cross_both_hops(relays):
    group = fleet(relays)
    try:
        calls = [lambda i=i: i * 10 for i in range(3)]
        assert [set(group.call(fn).values()) for fn in calls] == [{0}, {10}, {20}]
        assert set(group.call(lambda base, step=1, scale=1: (base + step) * scale, 1, scale=3).values()) == {6}
        assert set(group.call(helpers.fail_on, name='nobody', value='v').values()) == {'v'}
    finally:
        group.close()


def test_a_far_host_that_raises_names_itself(relays):
    group = fleet(relays)
    try:
        results = group.call(helpers.fail_on, 'b', 'apples')
    finally:
        group.close()
    assert dict(results.successful()) == {'a': 'apples', 'localhost': 'apples', 'c': 'apples'}
    error = results['b']
    assert isinstance(error, ErrorResult) and error.host == 'b'
    assert isinstance(error.exception, RemoteException) and error.exception.host == 'b'
    assert error.msg == "KeyError: 'no apples here'"
    assert 'in fail_on' in error.remote_traceback


def test_a_dead_far_host_does_not_hold_the_relay_past_the_timeout(relays):
    group = fleet(relays)
    try:
        assert group.connect().keys() == {'a', 'b', 'localhost', 'c'}
        results = group.call(helpers.hang_on, 'c', 120, timeout=3)
    finally:
        group.close()
    assert dict(results.successful()) == {'a': 'a', 'b': 'b', 'localhost': 'localhost'}
    assert isinstance(results['c'].exception, CallTimeout)
    assert results['c'].msg == 'call relay_group_helpers.hang_on did not finish within 3s'


def test_an_unreachable_far_host_says_which_and_via_what(sshd, relays):
    group = RelayedGroup({relays[0]: ['a?ssh_config=%s' % sshd.ssh_config, 'no-such-host.invalid'],
                          relays[1]: [Local('c')]}, progress=False)
    try:
        results = group.call(echo, 1)
        assert dict(results.successful()) == {'c': 1}
        failed = results['no-such-host.invalid']
        assert isinstance(failed.exception, ConnectError)
        assert 'via relay1' in failed.msg
        # a connect that failed is not tried again by the next call (as in a Group)
        assert isinstance(group.call(echo, 2)['no-such-host.invalid'].exception, ConnectError)
    finally:
        group.close()


def test_an_unreachable_relay_fails_its_hosts_naming_it(sshd, relays):
    dead = Tunnel('no-such-relay.invalid', ssh_config=sshd.ssh_config, connect_timeout=20)
    group = RelayedGroup({dead: [Local('a'), Local('b')], relays[1]: [Local('c')]}, progress=False)
    try:
        results = group.call(echo, 'x')
    finally:
        group.close()
    assert dict(results.successful()) == {'c': 'x'}
    for host in ('a', 'b'):
        assert results[host].host == host
        assert results[host].msg.startswith('through the relay no-such-relay.invalid: could not connect')
        assert isinstance(results[host].exception.__cause__, ConnectError)


def test_a_relay_over_ssh_runs_its_group(ssh_alias):
    relay = Tunnel(ssh_alias)
    group = RelayedGroup({relay: [Local('a'), Local('b')]}, progress=False)
    try:
        first = group.call(helpers.pid_and_name)
        assert [name for _, name in first.values()] == ['a', 'b']
        assert group.call(helpers.pid_and_name) == first
        assert set(group.call(lambda x, y=0: x + y, 1, y=2).values()) == {3}
        ran = group.run('echo hi')
        assert {host: r.stdout for host, r in ran.items()} == {'a': 'hi\n', 'b': 'hi\n'}
    finally:
        group.close()
        relay.close()


def test_a_group_opened_via_relays_becomes_one_call_per_relay(relays):
    via = Group([Local('a', via=relays[0]), Local('b', via=relays[0]), Local('c', via=relays[1])])
    with RelayedGroup(via, progress=False) as group:
        assert [r.host for r in group.relays] == ['relay1', 'relay2']
        assert group.hosts_of(relays[0]) == ['a', 'b']
        assert dict(group.call(helpers.host_name)) == {'a': 'a', 'b': 'b', 'c': 'c'}
        pids = group.call(os.getpid)
    assert all(gone(pid) for pid in pids.values())
    with pytest.raises(ValueError, match='no relay'):
        RelayedGroup([Local('direct')])
    with pytest.raises(ValueError, match=r"named 'localhost' \(behind relay1 and relay2\)"):
        RelayedGroup({relays[0]: ['local'], relays[1]: [Local('localhost')]})


def test_a_relay_that_restarted_is_set_up_again(relays):
    group = fleet(relays)
    try:
        first = group.call(helpers.pid_and_name)
        relays[0].close()  # its agent, and the far agents with it, are gone
        again = group.call(helpers.pid_and_name)
        assert [name for _, name in again.values()] == ['a', 'b', 'localhost', 'c']
        assert again['a'] != first['a'] and again['c'] == first['c']
    finally:
        group.close()


def test_a_hostile_relay_cannot_send_objects(relays):
    assert relays[0].call(helpers.make_hostile, 'crafted')
    group = RelayedGroup({relays[0]: ['a', 'b', 'c', 'd', 'e']}, progress=False)
    results = group.call(echo, 1)
    assert list(results) == ['a', 'b', 'c', 'd', 'e']  # no 'intruder'
    assert results['a'] == helpers.PICKLE  # bytes, never unpickled
    for host in 'bcde':
        assert isinstance(results[host], ErrorResult) and results[host].host == host
        assert 'relay1' in results[host].msg
    assert isinstance(results['c'].exception, ProtocolError)
    assert 'sent no result' in results['d'].msg
    assert type(results['e'].exception).__name__ == 'ChopsticksError'  # not a CommandFailed


def test_a_relay_that_sends_an_unsendable_value_fails_its_hosts(relays):
    assert relays[0].call(helpers.make_hostile, 'unsendable')
    results = RelayedGroup({relays[0]: ['a']}, progress=False).call(echo, 1)
    assert results['a'].msg.startswith('through the relay relay1: ')
    assert 'Unsendable' in results['a'].msg


def test_a_hung_relay_does_not_hang_the_controller(relays, monkeypatch):
    monkeypatch.setattr(relaygroup, 'RELAY_REPLY_MARGIN', 1.0)
    assert relays[0].call(helpers.make_hostile, 'hang')
    group = RelayedGroup({relays[0]: ['a'], relays[1]: [Local('b')]}, progress=False)
    try:
        results = group.call(echo, 1, timeout=2)
    finally:
        group.close()
    assert results['b'] == 1
    assert isinstance(results['a'].exception.__cause__, CallTimeout)
    assert results['a'].msg.startswith('through the relay relay1: ')


def test_a_relay_on_the_oldest_python_connects_its_hosts_at_once(pythons):
    """The relay half runs on Python 3.6; its far hosts (its own interpreter)
    connect concurrently, each sent the agent compiled by the relay: the
    payload's length in each stub must match what is sent."""
    oldest = pythons[0]
    relay = Local('old-relay', python=oldest)
    group = RelayedGroup({relay: [Local('far%d' % i) for i in range(8)]}, progress=False)
    try:
        results = group.call(helpers.version)
        assert not list(results.failures())
        versions = set(results.values())
        assert len(versions) == 1 and versions == {tuple(relay.call(helpers.version))}
    finally:
        group.close()
        relay.close()

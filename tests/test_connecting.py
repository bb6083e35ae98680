"""call_async and acall never wait for a connect: it happens in the background, bounded.

The hosts are Local tunnels whose python is a shell script that holds the
connect back until the test lets it go (a file appears), so every assertion
is about order and state, never about time.
"""
import asyncio
import os
import sys
import time

import pytest

from chopsticks import ConnectError, Local, TunnelClosed
from chopsticks.connecting import background_connects
from remote_helpers import echo

GATE = '''#!/bin/sh
# A python that starts only once $DIR/go exists; counts connects under way.
mkdir "{dir}/connecting/$$"
ls "{dir}/connecting" | wc -l >> "{dir}/counts"
while [ ! -e "{dir}/go" ]; do sleep 0.01; done
rmdir "{dir}/connecting/$$"
exec {python} "$@"
'''


@pytest.fixture
def gate(tmp_path):
    """(python, open_gate, connecting, counts): a python held back until open_gate()."""
    (tmp_path / 'connecting').mkdir()
    script = tmp_path / 'python'
    script.write_text(GATE.format(dir=tmp_path, python=sys.executable))
    script.chmod(0o755)

    def open_gate():
        (tmp_path / 'go').touch()

    def connecting():
        return len(os.listdir(tmp_path / 'connecting'))

    def counts():
        path = tmp_path / 'counts'
        return [int(n) for n in path.read_text().split()] if path.exists() else []

    yield str(script), open_gate, connecting, counts
    open_gate()  # no script is left waiting


def wait_until(predicate, what):
    deadline = time.monotonic() + 120
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError('gave up waiting for ' + what)
        time.sleep(0.01)


def test_call_async_returns_before_the_connect(gate):
    python, open_gate, connecting, _ = gate
    t = Local('slow', python=python)
    try:
        first = t.call_async(echo, 1)
        later = [t.call_async(echo, i) for i in (2, 3)]
        assert not first.done() and not t.connected  # returned while the connect waits
        wait_until(lambda: connecting() == 1, 'the connect to start')
        open_gate()
        assert first.result(timeout=120) == 1
        assert [f.result(timeout=120) for f in later] == [2, 3]
        assert t.connected
        assert connecting() == 0  # one connect served all three calls
    finally:
        t.close()


def test_a_tunnel_closed_while_it_connects_stays_closed(gate):
    python, open_gate, connecting, _ = gate
    t = Local('closed-early', python=python)
    future = t.call_async(echo, 1)
    wait_until(lambda: connecting() == 1, 'the connect to start')
    t.close()  # the connect is under way: it must not leave the tunnel connected
    open_gate()
    with pytest.raises(TunnelClosed, match=r'\[closed-early\] the tunnel was closed'):
        future.result(timeout=120)
    assert not t.connected
    assert t.call(echo, 2) == 2  # a later call connects again, as after any close()
    t.close()


def test_connect_error_arrives_through_the_future():
    t = Local('nowhere', python='/nonexistent/python3')
    future = t.call_async(echo, 1)
    with pytest.raises(ConnectError) as info:
        future.result(timeout=120)
    assert 'nowhere' in str(info.value) and '/nonexistent/python3' in str(info.value)
    assert not t.connected


def test_acall_connect_error_names_the_host():
    async def main():
        return await Local('nowhere', python='/nonexistent/python3').acall(echo, 1)

    with pytest.raises(ConnectError, match='nowhere'):
        asyncio.run(main())


def test_acalls_on_new_tunnels_connect_in_parallel(gate):
    python, open_gate, connecting, _ = gate
    tunnels = [Local('slow%d' % i, python=python) for i in range(3)]

    async def main():
        calls = asyncio.gather(*(t.acall(echo, i) for i, t in enumerate(tunnels)))
        # Every connect is under way before any may finish: one after the
        # other, the first would wait for the gate forever.
        deadline = time.monotonic() + 120
        while connecting() < 3:
            assert time.monotonic() < deadline, 'the connects did not all start'
            await asyncio.sleep(0.01)
        open_gate()
        return await calls

    try:
        assert asyncio.run(main()) == [0, 1, 2]
    finally:
        for t in tunnels:
            t.close()


def test_background_connects_are_bounded(gate, monkeypatch):
    python, open_gate, connecting, counts = gate
    throttle = background_connects().throttle
    monkeypatch.setattr(throttle, 'max_connect', 2)
    monkeypatch.setattr(throttle, 'limit', 2)
    tunnels = [Local('slow%d' % i, python=python) for i in range(5)]
    try:
        futures = [t.call_async(echo, i) for i, t in enumerate(tunnels)]
        wait_until(lambda: connecting() >= 2, 'two connects to start')
        open_gate()
        assert [f.result(timeout=120) for f in futures] == [0, 1, 2, 3, 4]
        assert max(counts()) == 2 and len(counts()) == 5
    finally:
        for t in tunnels:
            t.close()

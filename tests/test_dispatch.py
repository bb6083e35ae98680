"""The group scheduler (chopsticks.dispatch) alone, with fake tunnels: no processes.

The live tests (test_group.py, test_queue.py, test_faults.py) run it on real
tunnels; these pin down what it decides: retries of dropped connects, the
bound on connects at once and its halving, deadlines, the order of jobs on
one tunnel, and how errors reach the caller.
"""
import concurrent.futures
import threading

import pytest

from chopsticks import dispatch
from chopsticks.dispatch import Dispatcher
from chopsticks.errors import CallTimeout, ConnectError, RemoteException, TunnelClosed
from chopsticks.group import ErrorResult, Group
from chopsticks.operations import call_op

DROPPED = 'kex_exchange_identification: read: Connection reset by peer'


class FakeTunnel(object):
    """A tunnel whose connects and calls do what the test says.

    ``connect_errors``: what successive connects raise (None: succeed);
    ``answer(fn, args)``: a call's Future (default: ``fn(*args)`` at once).
    """

    def __init__(self, host, connect_errors=(), answer=None, before_connect=None):
        self.host = host
        self.connected = False
        self.connect_errors = list(connect_errors)
        self.connects = 0
        self.closes = 0
        self.calls = []
        self.answer = answer
        self.before_connect = before_connect
        self.closed_event = threading.Event()

    def connect(self):
        self.connects += 1
        if self.before_connect is not None:
            self.before_connect(self)
        error = self.connect_errors.pop(0) if self.connect_errors else None
        if error is not None:
            raise error
        self.connected = True
        return self

    @property
    def remote_info(self):
        return {'host': self.host}

    def close(self):
        self.closes += 1
        self.connected = False
        self.closed_event.set()

    def call_async(self, fn, *args, **kwargs):
        self.calls.append((fn, args))
        if self.answer is not None:
            return self.answer(fn, args)
        future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future

    def put(self, local_path, remote_path=None, mode=0o644, **kwargs):
        self.closed_event.wait(30)  # a transfer that hangs until its tunnel is closed
        raise TunnelClosed('[%s] closed during the put' % self.host)

    def __repr__(self):
        return 'FakeTunnel(%r)' % self.host


def dropped(host):
    return ConnectError(host, 'could not connect', DROPPED)


class Concurrency(object):
    """Counts connects running at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def __enter__(self):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)

    def __exit__(self, *exc_info):
        with self.lock:
            self.active -= 1


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(dispatch, 'RETRY_BACKOFF', 0.001)


def add(dispatcher, tunnel, fn, *args, timeout=None):
    outcomes = []
    dispatcher.add(tunnel, call_op(fn, args, {}), lambda value, exc: outcomes.append((value, exc)),
                   timeout)
    return outcomes


def answer_one():
    return 1


# -- connects ---------------------------------------------------------------------------


def test_a_connect_dropped_at_the_handshake_is_retried(quick_retries):
    flaky = FakeTunnel('flaky', connect_errors=[dropped('flaky'), dropped('flaky')])
    result = Group([flaky], progress=False).call(answer_one)
    assert result == {'flaky': 1}
    assert flaky.connects == 3


def test_retries_give_up_after_connect_retries(quick_retries):
    hopeless = FakeTunnel('hopeless', connect_errors=[dropped('hopeless')] * 10)
    result = Group([hopeless], progress=False).call(answer_one)
    assert isinstance(result['hopeless'], ErrorResult)
    assert 'kex_exchange_identification' in str(result['hopeless'].exception.stderr)
    assert hopeless.connects == 1 + dispatch.CONNECT_RETRIES


def test_a_refused_connect_is_not_retried_and_is_remembered():
    refused = FakeTunnel('refused', connect_errors=[ConnectError('refused', 'could not connect',
                                                                 'Connection refused')])
    ok = FakeTunnel('ok')
    group = Group([refused, ok], progress=False)
    first = group.call(answer_one)
    assert first['ok'] == 1 and 'Connection refused' in first['refused'].exception.stderr
    second = group.call(answer_one)
    assert second['refused'].exception is first['refused'].exception
    assert refused.connects == 1  # a dead host costs one connect, not one per call
    group.connect()  # tries again
    assert refused.connects == 2


def test_max_connect_bounds_the_connects_at_once():
    gate = Concurrency()
    all_in = threading.Barrier(3, timeout=10)

    def slow_connect(tunnel):
        with gate:
            if tunnel.host in ('h0', 'h1', 'h2'):
                try:
                    all_in.wait()  # the first three meet: three at once is reachable
                except threading.BrokenBarrierError:
                    pass
            else:
                threading.Event().wait(0.02)  # long enough for others to overlap, if allowed

    tunnels = [FakeTunnel('h%d' % i, before_connect=slow_connect) for i in range(10)]
    result = Group(tunnels, progress=False, max_connect=3).call(answer_one)
    assert result == {t.host: 1 for t in tunnels}
    assert gate.peak == 3


def test_each_dropped_connect_halves_the_connects_at_once(quick_retries):
    """sshd's MaxStartups drops connects past a burst: the retries must not
    come back as the same burst."""
    first_wave = Concurrency()
    retries = Concurrency()
    burst = threading.Barrier(8, timeout=10)
    retry_may_end = threading.Event()

    def connect(tunnel):
        if tunnel.connects == 1:
            with first_wave:
                try:
                    burst.wait()  # eight at once, as max_connect allows
                except threading.BrokenBarrierError:
                    pass
        else:
            with retries:
                retry_may_end.wait(0.05)  # long enough for others to overlap, if allowed

    tunnels = [FakeTunnel('h%d' % i, connect_errors=[dropped('h%d' % i)], before_connect=connect)
               for i in range(8)]
    result = Group(tunnels, progress=False, max_connect=8).call(answer_one)
    assert result == {t.host: 1 for t in tunnels}
    assert first_wave.peak == 8
    assert retries.peak < 8


# -- deadlines ---------------------------------------------------------------------------


def test_a_call_past_its_timeout_fails_alone_and_is_abandoned():
    never = []

    def hang(fn, args):
        future = concurrent.futures.Future()
        never.append(future)
        return future

    slow, quick = FakeTunnel('slow', answer=hang), FakeTunnel('quick')
    result = Group([slow, quick], progress=False).call(answer_one, timeout=0.2)
    assert result['quick'] == 1
    assert isinstance(result['slow'].exception, CallTimeout)
    assert result['slow'].msg == 'call test_dispatch.answer_one did not finish within 0.2s'
    assert never[0].cancelled()  # its late reply is dropped
    assert slow.closes == 0      # a call is abandoned; the tunnel stays up


def test_a_transfer_past_its_timeout_is_aborted_by_closing_its_tunnel(tmp_path):
    source = tmp_path / 'f'
    source.write_bytes(b'x')
    stuck = FakeTunnel('stuck')
    stuck.connected = True
    result = Group([stuck], progress=False).put(str(source), '/tmp/f', timeout=0.2)
    assert isinstance(result['stuck'].exception, CallTimeout)
    assert stuck.closes == 1


# -- order and errors --------------------------------------------------------------------


def test_jobs_on_one_tunnel_run_in_order_and_tunnels_in_parallel():
    tunnels = [FakeTunnel('h%d' % i) for i in range(3)]
    dispatcher = Dispatcher(max_parallel=2, max_connect=2)
    outcomes = {t.host: [] for t in tunnels}
    for step in range(4):
        for tunnel in tunnels:
            dispatcher.add(tunnel, call_op(pow, (step, 1), {}),
                           lambda value, exc, host=tunnel.host: outcomes[host].append(value))
    assert dispatcher.pending == 12
    dispatcher.run()
    assert dispatcher.pending == 0
    assert outcomes == {t.host: [0, 1, 2, 3] for t in tunnels}
    assert all(t.connects == 1 for t in tunnels)


def test_errors_reach_the_settle_callback():
    def fail(fn, args):
        future = concurrent.futures.Future()
        future.set_exception(RemoteException('remote', 'KeyError', "'x'", 'Traceback ...'))
        return future

    def refuse(fn, args):
        raise TypeError('cannot send that')

    def cancel(fn, args):
        future = concurrent.futures.Future()
        future.cancel()
        return future

    group = Group([FakeTunnel('remote', answer=fail), FakeTunnel('local', answer=refuse),
                   FakeTunnel('lost', answer=cancel)], progress=False)
    result = group.call(answer_one)
    assert result['remote'].msg == "KeyError: 'x'"
    assert result['remote'].remote_traceback == 'Traceback ...'
    assert result['local'].msg == 'TypeError: cannot send that'
    assert isinstance(result['lost'].exception, TunnelClosed)


def test_a_failing_callback_is_raised_after_every_job_settled():
    dispatcher = Dispatcher(max_parallel=4, max_connect=4)
    tunnels = [FakeTunnel('h%d' % i) for i in range(3)]
    settled = []

    def settle(value, exc):
        settled.append(value)
        if len(settled) == 1:
            raise RuntimeError('callback bug')

    for tunnel in tunnels:
        dispatcher.add(tunnel, call_op(answer_one, (), {}), settle)
    with pytest.raises(RuntimeError, match='callback bug'):
        dispatcher.run()
    assert settled == [1, 1, 1]


def test_jobs_added_by_a_callback_run_in_the_same_run():
    dispatcher = Dispatcher(max_parallel=1, max_connect=1)
    tunnel = FakeTunnel('h')
    seen = []

    def then(value, exc):
        seen.append(value)
        if len(seen) < 3:
            dispatcher.add(tunnel, call_op(pow, (2, len(seen)), {}), then)

    dispatcher.add(tunnel, call_op(pow, (2, 0), {}), then)
    dispatcher.run()
    assert seen == [1, 2, 4]


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match='at least 1'):
        Dispatcher(max_parallel=0, max_connect=1)

"""Calling functions over Local tunnels: values, errors, concurrency, timeouts, output."""
import asyncio
import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from chopsticks import CallTimeout, ConnectError, Local, RemoteException, Tunnel, TunnelClosed
from chopsticks.broker import get_broker
from chopsticks.connection import Connection
from chopsticks.transport import ReaderState
from chopsticks.codec import EncodeError  # noqa: F401  (the type named in errors)

from test_codec import VALUES
from remote_helpers import (
    agent_pipe_sizes, echo, fail, generate_and_record, joined, note_then_sleep, produced_so_far,
    raise_flag, return_unsendable, sleep_then, wait_for_flag,
)


@pytest.fixture
def local():
    tunnel = Local()
    yield tunnel
    tunnel.close()


def test_call_runs_remotely(local):
    assert local.call(os.getpid) != os.getpid()
    assert local.call(os.getpid) == local.remote_info['pid']


def test_return_values_round_trip_exactly(local):
    result = local.call(echo, VALUES)
    assert result == VALUES
    assert [type(v) for v in result] == [type(v) for v in VALUES]


def test_remote_exception_carries_type_message_and_traceback(local):
    with pytest.raises(RemoteException) as info:
        local.call(fail, 'missing-key')
    err = info.value
    assert err.host == 'localhost'
    assert err.type_name == 'KeyError'
    assert 'missing-key' in err.msg
    assert 'in fail' in err.remote_traceback
    assert 'KeyError' in str(err) and 'in fail' in str(err) and '[localhost]' in str(err)
    assert local.call(echo, 1) == 1  # still usable


def test_qualified_type_name_for_non_builtin_exceptions(local):
    with pytest.raises(RemoteException) as info:
        local.call(subprocess.check_call, ['false'])
    assert info.value.type_name == 'subprocess.CalledProcessError'


def test_unsendable_return_value_fails_that_call_only(local):
    with pytest.raises(RemoteException) as info:
        local.call(return_unsendable)
    assert 'Unsendable' in info.value.msg
    assert local.call(echo, 'ok') == 'ok'


def test_unpicklable_argument_is_a_clear_error_and_tunnel_survives(local):
    with pytest.raises(Exception) as info:
        local.call(echo, threading.Lock())
    assert 'lock' in str(info.value).lower()
    assert local.call(echo, 2) == 2


def test_many_calls_in_flight_from_many_threads(local):
    results = {}

    def worker(n):
        results[n] = [local.call(echo, (n, i)) for i in range(50)]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: [(n, i) for i in range(50)] for n in range(8)}


def test_remote_runs_calls_concurrently(local):
    # Five calls that each sleep 1s: run one at a time, they would take 5s.
    futures = [local.call_async(sleep_then, 1.0, n) for n in range(5)]
    start = time.monotonic()
    assert [f.result(timeout=30) for f in futures] == list(range(5))
    # concurrency, not speed: the five sleeps overlapped
    assert time.monotonic() - start < 4.0


def test_async_result_timeout_is_honoured_and_the_call_still_answers(local):
    future = local.call_async(sleep_then, 2.0, 'late')
    start = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.3)
    # The timeout, not the call; the margin is for a loaded CI machine.
    assert time.monotonic() - start < 1.5
    assert future.exception(timeout=30) is None
    assert future.result() == 'late'


def test_futures_awaited_from_many_threads_all_settle(local):
    futures = [local.call_async(sleep_then, 0.05 * (n % 4), n) for n in range(40)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda f: f.result(timeout=30), futures))
    assert results == list(range(40))
    assert concurrent.futures.wait(futures, timeout=0).not_done == set()


def test_call_futures_are_whole_futures(local):
    # A tunnel's futures share one Condition (see CallFuture); everything
    # else a Future has, they must have on this Python, for the standard
    # library's helpers.
    future = local.call_async(echo, 1)
    assert set(vars(concurrent.futures.Future())) <= set(vars(future))
    futures = [future] + [local.call_async(sleep_then, 0.01 * n, n) for n in range(2, 6)]
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=30)) == [1, 2, 3, 4, 5]
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert done == set(futures) and not not_done

    async def awaited():
        return await asyncio.wrap_future(local.call_async(echo, 'awaited'))
    assert asyncio.run(awaited()) == 'awaited'


def test_a_waiter_woken_by_another_reply_keeps_waiting(local):
    # While another thread reads the tunnel, result() waits on the
    # Condition the tunnel's futures share: every reply wakes it, and it
    # must wait on, not time out at the first one.
    local.connect()
    reader = threading.Thread(target=local.call, args=(time.sleep, 1.5))
    reader.start()
    time.sleep(0.2)  # the reader holds the pipe now
    slow = local.call_async(sleep_then, 1.0, 'slow')
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(slow.result(timeout=20)))
    waiter.start()
    time.sleep(0.1)
    assert [local.call_async(echo, n).result(timeout=20) for n in range(10)] == list(range(10))
    waiter.join()
    reader.join()
    assert outcome == ['slow']


def test_a_done_callback_may_call_the_same_tunnel(local):
    """A future's callback runs on the thread that read its reply (the
    broker's, or a caller's): a call it makes there must not wait for that
    thread, and what streams meanwhile keeps its order."""
    items = local.call_iter(generate_and_record, 300)
    seen = []
    done = threading.Event()

    def callback(future):
        seen.append((future.result(), local.call(echo, 'from the callback')))
        done.set()

    local.call_async(echo, 'first').add_done_callback(callback)
    assert list(items) == list(range(300))
    assert done.wait(30)
    assert seen == [('first', 'from the callback')]


def test_a_done_callback_waiting_on_a_tunnel_the_broker_reads_fails_instead_of_hanging(
        local, sshd):
    """The broker thread reads a paramiko tunnel's replies, and every tunnel's
    generator items; a callback running there that waited for them would wait
    for itself, and every tunnel would stop with it (it did).  It fails at
    once, and the broker goes on."""
    other = Tunnel('host1', transport='paramiko')
    try:
        assert other.call(echo, 'connected') == 'connected'
        outcome = []
        done = threading.Event()

        def callback(future):
            outcome.append(threading.current_thread() is get_broker().thread)
            try:
                outcome.append(other.call(echo, 'from the callback', timeout=20))
            except RuntimeError as e:
                outcome.append(e)
            try:
                other.call_async(echo, 'a future').result(timeout=20)
            except RuntimeError as e:
                outcome.append(e)
            try:  # items come through the broker on any transport
                list(local.call_iter(generate_and_record, 3, timeout=20))
            except RuntimeError as e:
                outcome.append(e)
            done.set()

        # Nobody waits for this one: the broker reads its reply and runs the callback.
        local.call_async(sleep_then, 0.3, 'first').add_done_callback(callback)
        assert done.wait(60)
        on_broker, errors = outcome[0], outcome[1:]
        assert on_broker
        assert len(errors) == 3 and all(isinstance(e, RuntimeError) for e in errors), errors
        assert 'host1' in str(errors[0]) and 'echo' in str(errors[0])
        assert other.call(echo, 'still served') == 'still served'
    finally:
        other.close()


def test_timeout_raises_and_tunnel_stays_usable(local):
    with pytest.raises(CallTimeout) as info:
        local.call(time.sleep, 5, timeout=0.3)
    assert 'localhost' in str(info.value) and 'sleep' in str(info.value)
    assert local.call(echo, 3) == 3


@pytest.mark.parametrize('before', ['fresh', 'after_calls', 'after_idling'])
def test_calls_from_other_threads_finish_while_one_waits_on_a_long_call(local, before):
    # The waiting caller reads the tunnel itself: it must hand the others
    # their replies, not only wait for its own.  And the agent runs the long
    # call on its reader thread, so its relief thread must hand reading on,
    # whether it has never run ('fresh'), looks now and then because calls
    # came ('after_calls') or has parked after a second without any
    # ('after_idling', agent.RELIEF_PARK_AFTER).
    local.connect()
    if before == 'after_calls':
        for _ in range(20):
            local.call(echo, None)
            time.sleep(0.01)
    elif before == 'after_idling':
        local.call(echo, None)
        time.sleep(1.5)
    waiter = threading.Thread(target=local.call, args=(time.sleep, 3))
    waiter.start()
    time.sleep(0.3)
    results = []

    def worker(n):
        results.extend(local.call(echo, (n, i), timeout=10) for i in range(20))

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert sorted(results) == [(n, i) for n in range(4) for i in range(20)]
    assert waiter.is_alive()  # the long call was still waiting all along
    waiter.join()


def test_calls_of_every_length_around_the_reader_handover(local):
    # The agent runs a call on its reader thread and hands reading to another
    # thread when the call lasts a couple of milliseconds: calls that end just
    # as the handover happens must neither lose the reader nor their reply.
    durations = [(n % 13) * 0.0005 for n in range(120)]

    def worker(offset, out):
        out.extend(local.call(sleep_then, d, (offset, i), timeout=30)
                   for i, d in enumerate(durations))

    results = [[] for _ in range(3)]
    threads = [threading.Thread(target=worker, args=(n, results[n])) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[(n, i) for i in range(len(durations))] for n in range(3)]


def test_a_call_may_wait_for_one_sent_after_it(local):
    # Calls in flight together reach the agent in one read, and it runs them
    # one after the other on its reader thread: the one that blocks must
    # not hold back those behind it, nor their replies.
    local.call(echo, 'the helpers are imported')
    for round_ in range(5):
        name = 'flag %d' % round_
        # The first call goes out alone; the others queue behind it and go
        # in one write, so the waiting call is not the last of its read.
        before = [local.call_async(echo, n) for n in range(20)]
        waiting = local.call_async(wait_for_flag, name, 10)
        between = [local.call_async(echo, n) for n in range(20)]
        raising = local.call_async(raise_flag, name)  # the last: no read comes after it
        assert waiting.result(timeout=30) is True  # not False: raised within its 10 s
        assert raising.result(timeout=30) == name
        assert [f.result(timeout=30) for f in before + between] == list(range(20)) * 2


def _process_state(pid):
    with open('/proc/%d/stat' % pid) as f:
        return f.read().rsplit(')', 1)[1].split()[0]


def test_replies_to_a_long_batch_of_calls_are_not_held_to_its_end(local, tmp_path):
    # The agent runs the calls of one read in a row and holds their replies
    # to send them together, but only for a moment: answers (a keepalive's
    # too) must not wait for a whole batch.  The agent is stopped while the
    # calls queue up, so that they arrive in one read.
    started = tmp_path / 'started'
    local.call(note_then_sleep, str(tmp_path / 'warm'), 0)  # imported now, not in the batch
    agent_pid = local.call(os.getpid)
    futures = []

    def pile_up():
        for _ in range(500):
            futures.append(local.call_async(note_then_sleep, str(started), 0))

    # The calls go from another thread: a pipe smaller than they are (a busy
    # machine gives 4 KiB pipes, see pipe(7)) blocks the sender until the
    # agent resumes, and this thread must be free to resume it.
    sender = threading.Thread(target=pile_up, daemon=True)
    os.kill(agent_pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while _process_state(agent_pid) != 'T' and time.monotonic() < deadline:
            time.sleep(0.01)  # kill only sends the signal
        sender.start()
        sender.join(5)
        time.sleep(0.3)  # all written to the pipe (42 kB)
    finally:
        os.kill(agent_pid, signal.SIGCONT)
    batch_fitted = not sender.is_alive()
    sender.join(60)
    assert not sender.is_alive()
    if not batch_fitted:
        pytest.skip('the agent\'s stdin pipe holds %d bytes here, too few for the batch '
                    'to arrive in one read' % local.call(agent_pipe_sizes)[0])
    futures[0].result(timeout=30)
    assert len(started.read_text()) < 2 * 250  # the first answer came before half had started
    assert [f.result(timeout=60) for f in futures] == [None] * 500


@pytest.mark.parametrize('then', ['call', 'call_async', 'thread_ends'])
def test_a_pipe_kept_by_one_caller_reaches_the_others(local, then):
    """After a call, the calling thread keeps the pipe for its next call
    (ProcessTransport.hold_stdout).  Another thread's call, or a future
    awaited where nobody reads, must still get its reply, whether the
    keeper waits idle or has ended, with no pause beyond a broker tick."""
    kept, done = threading.Event(), threading.Event()
    local.connect()

    def keeper():
        local.call(echo, 'first')
        kept.set()
        if then != 'thread_ends':
            done.wait(30)

    thread = threading.Thread(target=keeper)
    thread.start()
    assert kept.wait(30)
    if then == 'thread_ends':
        thread.join(30)
    try:
        if then == 'call_async':
            future = local.call_async(echo, 'second')
            assert future.result(timeout=10) == 'second'
        else:
            results = []
            other = threading.Thread(target=lambda: results.append(
                local.call(echo, 'second', timeout=10)))
            other.start()
            other.join(30)
            assert results == ['second']
    finally:
        done.set()
        thread.join(30)
    assert local.call(echo, 'third') == 'third'  # and the keeper's thread is any thread


def test_a_large_reply_read_at_once_is_decoded_by_its_caller(local):
    """A call made alone whose large reply (beyond what the broker decodes
    inline) comes whole in the first read: its caller decodes it, rather
    than hand it to the decode thread (whose result the caller would
    notice only at its next half-second look)."""
    local.connect()
    local.call(echo, 1)
    conn = local._conn
    size = 100 << 10  # a small call, a reply of 100 KiB
    with conn.wide_pipe('receive'):  # room for the whole reply in the pipe
        for _ in range(5):
            assert local.call(bytes, size) == bytes(size)
    assert conn.decoding.thread is None


def test_a_large_error_read_at_once_is_decoded_by_its_caller(local):
    """The same for a large ERROR frame, which goes the general way (only a
    RESULT is read as a lone reply): fed as the thread that reads alone."""
    local.connect()
    local.call(echo, 1)
    conn = local._conn
    with conn.wide_pipe('receive'):  # room for the whole error in the pipe
        for _ in range(5):
            with pytest.raises(RemoteException, match='KeyError'):
                local.call(lambda: fail('x' * (60 << 10)))
    assert conn.decoding.thread is None


def test_closing_a_tunnel_whose_pipe_is_kept_closes_the_pipe():
    tunnel = Local()
    tunnel.connect()
    tunnel.call(echo, 1)  # this thread now keeps stdout for its next call
    assert tunnel._conn.transport.state is ReaderState.HELD
    stdout = tunnel._conn.transport.stdout
    tunnel.close()
    assert stdout.closed


def test_close_from_another_thread_ends_a_waiting_call(local):
    local.connect()
    closer = threading.Timer(0.3, local.close)
    closer.start()
    with pytest.raises(TunnelClosed, match='localhost'):
        local.call(time.sleep, 30, timeout=20)  # not CallTimeout: close() reached it
    closer.join()
    assert local.call(echo, 'back') == 'back'  # reconnects


@pytest.mark.parametrize('pipe', ['stdout', 'stderr'])
def test_a_pipe_is_not_closed_under_the_thread_reading_it(monkeypatch, pipe):
    """The broker thread may be paused (by the GIL, by the scheduler) between
    taking a pipe's fd number and reading from it.  A tunnel closed by another
    thread meanwhile must not free that number: a new tunnel's pipe would get
    it, and the broker would read that tunnel's bytes (its agent's HELLO,
    seen on CI: the new tunnel then never connected).  The pause is made
    long here, and a pipe of our own stands for the new tunnel's."""
    old = Local()
    old_pid = old.call(os.getpid)
    fd = getattr(old._conn.transport, pipe).fileno()
    broker = get_broker()
    paused, resumed = threading.Event(), threading.Event()
    real_readv = os.readv

    def slow_readv(number, buffers):
        if number != fd or threading.current_thread() is not broker.thread or paused.is_set():
            return real_readv(number, buffers)
        paused.set()
        time.sleep(1.0)
        try:
            return real_readv(number, buffers)
        finally:
            resumed.set()

    monkeypatch.setattr(os, 'readv', slow_readv)
    if pipe == 'stdout':
        old.call_async(os.getpid)  # nobody waits for it: the broker reads the reply
    else:
        old.call(os.write, 2, b'a line on stderr\n')  # the broker reads stderr
    assert paused.wait(10)
    old.close()
    # Our pipe gets the lowest free numbers, as the new tunnel's would: make
    # sure its read end gets ``fd`` if ``fd`` is free.
    held, ours = [], None
    while ours is None:
        r, w = os.pipe()
        if w == fd:  # a write end is never read: take its number off, try again
            os.close(r)
            os.close(w)
            held.append(os.open(os.devnull, os.O_RDONLY))
            continue
        held += [r, w]
        if r >= fd:
            ours = (r, w)
    try:
        os.write(ours[1], b'not for the old tunnel')
        assert resumed.wait(10)
        os.set_blocking(ours[0], False)
        assert os.read(ours[0], 100) == b'not for the old tunnel'
    finally:
        for number in held:
            os.close(number)
    monkeypatch.undo()
    with Local() as new:
        assert new.call(os.getpid) != old_pid


def test_the_broker_reads_a_pipe_whose_number_a_closed_file_left_registered(caplog):
    """Should a file ever be closed while registered (a bug), a new pipe that
    gets its fd number is still read, and the bug is logged."""
    broker = get_broker()
    number, w = os.pipe()
    stale = os.fdopen(number, 'rb', buffering=0)
    broker.register(stale, lambda: None)
    stale.close()
    r, w2 = os.pipe()
    if r != number:  # give the new pipe the stale one's number
        os.dup2(r, number)
        os.close(r)
    fresh = os.fdopen(number, 'rb', buffering=0)
    got = threading.Event()

    def on_readable():
        fresh.read(100)
        got.set()

    try:
        broker.register(fresh, on_readable)
        os.write(w2, b'x')
        assert got.wait(10)
        assert 'closed without being unregistered' in caplog.text
    finally:
        broker.unregister(fresh)
        fresh.close()
        for number in (w, w2):
            os.close(number)


def test_remote_killed_fails_a_waiting_call(local):
    local.connect()
    threading.Timer(0.3, os.kill, args=(local.remote_info['pid'], 9)).start()
    with pytest.raises(TunnelClosed, match='localhost'):
        local.call(time.sleep, 30, timeout=20)


def test_lazy_connect_close_and_reconnect(local):
    assert not local.connected
    first = local.call(os.getpid)
    local.close()
    assert not local.connected
    assert local.call(os.getpid) != first


def test_context_manager_closes():
    with Local() as tunnel:
        pid = tunnel.call(os.getpid)
    assert not tunnel.connected
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)


def test_remote_killed_fails_pending_calls_with_host_named(local):
    # Connected first: a call_async on a tunnel not connected yet is sent once
    # its connect is done, and if the agent died meanwhile, that connect is a
    # new one (the tunnel reconnects), where the call runs: not what this tests.
    local.connect()
    future = local.call_async(time.sleep, 30)
    os.kill(local.remote_info['pid'], 9)
    with pytest.raises(TunnelClosed, match=r'^\[localhost\] connection lost.*\(during time\.sleep\)$'):
        future.result(timeout=10)
    assert local.call(echo, 'back') == 'back'  # reconnects


def test_a_call_waiting_when_its_remote_dies_names_it(local):
    """The call this thread waits for, its reply read here (Connection.call)."""
    local.connect()
    pid = local.remote_info['pid']
    threading.Timer(0.5, os.kill, (pid, 9)).start()
    with pytest.raises(TunnelClosed, match=r'^\[localhost\] connection lost.*\(during time\.sleep\)$'):
        local.call(time.sleep, 30)
    local.connect()
    futures = [local.call_async(time.sleep, 30) for _ in range(2)]
    local.close()
    for future in futures:
        with pytest.raises(TunnelClosed, match=r'^\[localhost\] tunnel closed \(during time\.sleep\)$'):
            future.result(timeout=10)


def test_call_iter_streams_with_backpressure(local):
    items = local.call_iter(generate_and_record, 1000)
    first = next(items)
    assert first == 0
    time.sleep(0.5)
    # the remote ran ahead by at most its window, not to the end
    produced = local.call(produced_so_far)
    assert produced < 200
    assert list(items) == list(range(1, 1000))


def test_call_iter_error_is_raised_after_items(local):
    def gen():
        yield 1
        raise ValueError('half way')
    items = local.call_iter(gen)
    assert next(items) == 1
    with pytest.raises(RemoteException, match='half way'):
        next(items)


def shown_on_stderr(capsys, last_words, seconds=10):
    """What this process wrote to stderr until ``last_words`` appear (remote
    output is written by a thread of its own, a little later)."""
    deadline = time.monotonic() + seconds
    err = ''
    while time.monotonic() < deadline and last_words not in err:
        time.sleep(0.05)
        err += capsys.readouterr().err
    return err


def test_print_and_stderr_are_shown_with_host_prefix(local, capsys):
    def noisy():
        print('hello from print')
        sys.stderr.write('to stderr\n')
        os.system('echo from a child process')
        return 'done'
    assert local.call(noisy) == 'done'
    err = shown_on_stderr(capsys, 'child')
    assert '[localhost] hello from print' in err
    assert '[localhost] to stderr' in err
    assert '[localhost] from a child process' in err


def test_the_output_of_a_first_call_is_shown_however_late_the_caller_wakes(monkeypatch, capsys):
    """The first call goes out with the connect, so its output may be read
    before the connecting thread has seen the agent's HELLO (seen on a
    loaded machine: it was kept as connect noise, and never shown)."""
    real_wait_started = Connection.wait_started

    def wakes_late(self, timeout):
        time.sleep(0.5)  # the broker has read the call's output by now
        return real_wait_started(self, timeout)

    monkeypatch.setattr(Connection, 'wait_started', wakes_late)
    tunnel = Local('late')
    try:
        assert tunnel.call(os.system, 'echo output of the first call') == 0
        err = shown_on_stderr(capsys, 'first call')
        assert '[late] output of the first call' in err
    finally:
        tunnel.close()


def test_what_a_host_says_before_the_agent_starts_is_kept_for_errors_not_shown(tmp_path, capsys):
    noisy_python = tmp_path / 'noisy-python'
    noisy_python.write_text('#!/bin/sh\necho "a login banner" >&2\nexec %s "$@"\n' % sys.executable)
    noisy_python.chmod(0o755)
    with Local('noisy', python=str(noisy_python)) as tunnel:
        assert tunnel.call(os.system, 'echo after the start >&2') == 0
        err = shown_on_stderr(capsys, 'after the start')
        assert '[noisy] after the start' in err
        assert 'banner' not in err
        assert 'a login banner' in tunnel._conn.stderr_text()  # for a ConnectError


def test_remote_logging_reaches_controller_logging(local, caplog):
    def log_something():
        import logging
        logging.getLogger('myapp.remote').warning('disk %s is full', '/var')
        return True
    with caplog.at_level(logging.INFO):
        local.call(log_something)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not caplog.records:
            time.sleep(0.05)
    [record] = [r for r in caplog.records if r.name == 'myapp.remote']
    assert record.levelno == logging.WARNING
    assert record.host == 'localhost'
    assert 'disk /var is full' in record.getMessage()


@pytest.mark.parametrize('calls_before', [0, 3])
def test_an_idle_tunnel_still_hears_its_remote(local, caplog, calls_before):
    """After a call, the caller gives the pipe back to the broker (parked),
    or keeps it for its next call (held) until the broker takes it back:
    what the remote sends unasked must still arrive, and its exit be seen."""
    def log_later_then_exit():
        import logging
        import os
        import threading
        import time

        def later():
            time.sleep(0.3)
            logging.getLogger('myapp.background').warning('late news')
            time.sleep(0.3)
            os._exit(0)
        threading.Thread(target=later).start()
    for _ in range(calls_before):
        local.call(echo, None)
    with caplog.at_level(logging.INFO):
        local.call(log_later_then_exit)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and local.connected:
            time.sleep(0.05)
    [record] = [r for r in caplog.records if r.name == 'myapp.background']
    assert 'late news' in record.getMessage()
    assert not local.connected


def test_missing_interpreter_is_a_connect_error():
    with pytest.raises(ConnectError) as info:
        Local(python='/nonexistent/python3').call(echo, 1)
    assert 'localhost' in str(info.value)
    assert '/nonexistent/python3' in str(info.value)


def test_python2_is_refused_clearly():
    from conftest import python2
    path = python2()
    if not path:
        pytest.skip('no Python 2 interpreter on this machine')
    with pytest.raises(ConnectError) as info:
        Local(python=path).call(echo, 1)
    assert 'Python 2.7' in str(info.value) and '3.6' in str(info.value)


@pytest.mark.parametrize('how', ['call', 'call_async'])
def test_the_first_call_goes_out_with_the_connect(monkeypatch, how):
    """A call on a tunnel not connected yet goes right behind the agent,
    before the agent's HELLO is back: connecting costs no round trip more."""
    from chopsticks import wire
    from chopsticks.connection import Connection
    events = []
    send, dispatch = Connection.request, Connection.dispatch

    def recording_send(self, op, handler, payload):
        events.append('call sent')
        return send(self, op, handler, payload)

    def recording_dispatch(self, rid, op, payload):
        if op == wire.HELLO:
            events.append('hello received')
        return dispatch(self, rid, op, payload)

    monkeypatch.setattr(Connection, 'request', recording_send)
    monkeypatch.setattr(Connection, 'dispatch', recording_dispatch)
    t = Local()
    try:
        pid = t.call(os.getpid) if how == 'call' else t.call_async(os.getpid).result(30)
        assert pid == t.remote_info['pid']
    finally:
        t.close()
    assert events[:2] == ['call sent', 'hello received']


def test_a_first_call_pickled_for_the_remote_version_waits_for_the_hello(monkeypatch):
    """A function without source travels compiled, to a remote of this
    Python version only: it is pickled once the agent said which it runs."""
    from chopsticks import cache
    monkeypatch.setattr(Local, '_same_version', {})  # as if this interpreter were new to us,
    monkeypatch.setattr(cache, 'fact', lambda section, key: None)  # in this run and before
    namespace = {}
    exec('def no_source(x):\n    return x * 2\n', namespace)
    t = Local()
    try:
        assert t.call(namespace['no_source'], 21) == 42
    finally:
        t.close()


def test_every_available_interpreter_works(remote_python):
    with Local(python=remote_python) as tunnel:
        info = tunnel.remote_info
        assert os.path.realpath(info['python']) == os.path.realpath(remote_python)
        assert tunnel.call(echo, VALUES[:25]) == VALUES[:25]
        assert tunnel.call(lambda x: x + 1, 41) == 42
        with pytest.raises(RemoteException, match='ZeroDivisionError'):
            tunnel.call(divmod, 1, 0)
        # Frames this big are read straight into a buffer of their own (a
        # memoryview of it is what the agent unpickles) ...
        big = os.urandom(3 << 20)
        assert tunnel.call(echo, big) == big
        # ... and a stream still hands its function bytes.
        assert tunnel.call_stream(joined, [big, b'end']) == (['bytes'], big + b'end')


SCRIPT = '''
import collections, enum, functools, json, sys
sys.path.insert(0, {repo!r})
from chopsticks import Local

BASE = 10

def helper(x):
    return x * BASE

def uses_helper(x):
    return helper(x) + 1

def recursive(n):
    return 1 if n <= 1 else n * recursive(n - 1)

def make_adder(k):
    def add(x):
        return x + k
    return add

class Box:
    def __init__(self, v):
        self.v = v
    def twice(self):
        return self.v * 2

def is_even(n):
    return True if n == 0 else is_odd(n - 1)

def is_odd(n):
    return False if n == 0 else is_even(n - 1)

MODE = 'first'

def mode_after(delay):
    import time
    time.sleep(delay)
    return MODE

LIMIT = 10

class Base:
    def hello(self):
        return 'hi-%s' % json.dumps(LIMIT)

class Child(Base):
    pass

@functools.total_ordering
class Version:
    def __init__(self, n):
        self.n = n
    def __eq__(self, other):
        return self.n == other.n
    def __lt__(self, other):
        return self.n < other.n

class Color(enum.Enum):
    RED = 1

Point = collections.namedtuple('Point', 'x y')

with Local(python={python!r}) as t:
    print(t.call(uses_helper, 4))
    print(t.call(recursive, 5))
    print(t.call(make_adder(100), 1))
    print(t.call(lambda s: s.upper(), 'abc'))
    print(t.call(lambda: Box(21).twice()))
    print(t.call(is_even, 10))
    first = t.call_async(mode_after, 1.0)  # its globals go with it, as they are now
    MODE = 'second'
    print(first.result(), t.call(mode_after, 0))
    print(t.call(lambda c: c.hello(), Child()))  # the base class and the globals it uses
    print(t.call(lambda: Version(2) >= Version(1)))  # the decorator ran there too
    print(t.call(lambda c: c.value, Color.RED))
    print(t.call(lambda p: p.x + p.y, Point(1, 2)))
    print(t.call(lambda boxes: len(set(type(b) for b in boxes)), [Box(i) for i in range(50)]))
'''


@pytest.mark.parametrize('which', ['same', 'other'])
def test_functions_from_main_lambdas_and_closures(tmp_path, which):
    from conftest import available_pythons
    python = sys.executable
    if which == 'other':
        others = [p for p in available_pythons() if not p.endswith('%d.%d' % sys.version_info[:2])]
        if not others:
            pytest.skip('no second interpreter')
        python = others[0]  # the oldest: source travels across versions
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT.format(repo=os.path.dirname(os.path.dirname(__file__)), python=python))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['41', '120', '101', 'ABC', '42', 'True', 'first', 'second',
                                  'hi-10', 'True', '1', '3', '1']



@pytest.mark.parametrize('value', [
    'abc',
    ('same', 'same', 'same'),  # one string object referenced three times in the pickle
    (b'x' * 100000, 2 ** 70, -1.5, None, True),  # too big for the pickling shortcut
])
def test_arguments_arrive_as_sent(local, value):
    for _ in range(2):
        assert local.call(echo, value) == value
        assert local.call(echo, value=value) == value


def test_plain_arguments_arrive_as_sent(local):
    # A function called by reference is pickled once; each call with plain
    # arguments (str, bytes, numbers...) adds its arguments to that pickle.
    same = 'same'
    for _ in range(2):
        assert local.call(os.path.join, same, same, same) == 'same/same/same'
        assert local.call(int, 'ff', base=16) == 255
        assert local.call(len, b'x' * 100000) == 100000  # too big for the shortcut
        assert local.call(divmod, 2 ** 70, -1.5) == divmod(2 ** 70, -1.5)
        assert local.call(len, '') == 0

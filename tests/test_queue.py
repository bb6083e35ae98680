"""Queues over real Local tunnels: order per tunnel, parallel across tunnels,
callbacks that queue more, groups as targets, dead hosts."""
import os
import time

import pytest

from chopsticks import ConnectError, Local, RemoteException
from chopsticks.group import ErrorResult, Group, GroupResult
from chopsticks.queue import AsyncResult, NotCompleted, Queue
from remote_helpers import echo, fail

# (start, end) of a remote sleep, by the wall clock shared by Local tunnels.
span = lambda seconds: (time.time(), time.sleep(seconds), time.time())[::2]  # noqa: E731


@pytest.fixture
def a_b():
    a, b = Local('a'), Local('b')
    yield a, b
    a.close()
    b.close()


def test_value_before_run_is_not_completed(a_b):
    result = Queue().call(a_b[0], echo, 1)
    assert isinstance(result, AsyncResult) and not result.done
    with pytest.raises(NotCompleted):
        result.value


def test_a_callback_may_call_a_tunnel_the_queue_is_using(a_b):
    """Callbacks run on the thread that runs the queue, which reads the
    replies of the tunnels in use: a call from a callback must not wait for it."""
    a, b = a_b
    queue = Queue()
    checked = []
    queue.call(a, os.getpid).with_callback(lambda pid: checked.append(a.call(os.getpid) == pid))
    queue.call(b, span, 0.5)  # b stays busy meanwhile
    queue.run()
    assert checked == [True]


def test_operations_run_in_order_per_tunnel_and_in_parallel_across(a_b):
    a, b = a_b
    queue = Queue()
    finished = []
    on_a = [queue.call(a, span, 0.3).with_callback(lambda v: finished.append('a1')),
            queue.call(a, span, 0.01).with_callback(lambda v: finished.append('a2')),
            queue.call(a, span, 0.01).with_callback(lambda v: finished.append('a3'))]
    on_b = queue.call(b, span, 0.3)
    queue.run()
    assert [f for f in finished if f.startswith('a')] == ['a1', 'a2', 'a3']
    spans_a = [r.value for r in on_a]
    for (_, end), (start, _) in zip(spans_a, spans_a[1:]):
        assert start >= end  # one after the other on a
    (a_start, a_end), (b_start, b_end) = spans_a[0], on_b.value
    assert a_start < b_end and b_start < a_end  # a and b overlapped


def test_callbacks_may_queue_more(a_b):
    a, b = a_b
    queue = Queue()
    results = []

    def then_on_b(value):
        results.append(queue.call(b, echo, value + '-then-b'))

    results.append(queue.call(a, echo, 'a').with_callback(then_on_b))
    queue.run()
    assert [r.value for r in results] == ['a', 'a-then-b']
    assert len(queue) == 0


def test_callback_on_finished_result_runs_at_once(a_b):
    queue = Queue()
    result = queue.call(a_b[0], echo, 5)
    queue.run()
    seen = []
    assert result.with_callback(seen.append) is result
    assert seen == [5]


def test_failure_raises_from_value_and_callback_gets_error_result(a_b):
    queue = Queue()
    seen = []
    result = queue.call(a_b[0], fail, 'bad').with_callback(seen.append)
    after = queue.call(a_b[0], echo, 'still runs')
    queue.run()
    with pytest.raises(RemoteException) as info:
        result.value
    assert info.value.type_name == 'KeyError'
    assert isinstance(seen[0], ErrorResult) and seen[0] is result.error
    assert after.value == 'still runs'


def test_group_target_gives_a_group_result(a_b):
    a, b = a_b
    group = Group([a, b, 'nonexistent.invalid'])
    queue = Queue()
    pids = queue.call(group, os.getpid)
    first = queue.connect(a)
    queue.run()
    assert isinstance(pids.value, GroupResult)
    assert list(pids.value) == ['a', 'b', 'nonexistent.invalid']
    assert pids.value['a'] == a.remote_info['pid']
    assert isinstance(pids.value['nonexistent.invalid'].exception, ConnectError)
    assert first.value['pid'] == a.remote_info['pid']


def test_dead_host_fails_each_operation_at_once(a_b):
    dead = Group(['nonexistent.invalid']).tunnels[0]
    queue = Queue()
    results = [queue.call(dead, echo, i) for i in range(3)]
    ok = queue.call(a_b[0], echo, 'ok')
    queue.run()
    assert ok.value == 'ok'
    errors = [r.error for r in results]
    assert all(isinstance(e.exception, ConnectError) for e in errors)
    assert errors[0].exception is errors[2].exception  # connected once, not three times
    with pytest.raises(ConnectError, match='Could not resolve hostname'):
        results[1].value


def test_timeout_fails_that_operation_and_the_tunnel_goes_on(a_b):
    queue = Queue()
    slow = queue.call(a_b[0], time.sleep, 30, timeout=0.5)
    next_one = queue.call(a_b[0], echo, 'next')
    queue.run()
    assert 'did not finish within 0.5s' in slow.error.msg
    assert next_one.value == 'next'


def test_callback_exception_is_raised_by_run_after_the_rest(a_b):
    queue = Queue()

    def broken(value):
        raise RuntimeError('callback bug')

    queue.call(a_b[0], echo, 1).with_callback(broken)
    other = queue.call(a_b[1], echo, 2)
    with pytest.raises(RuntimeError, match='callback bug'):
        queue.run()
    assert other.value == 2


def test_bad_target_is_a_type_error():
    with pytest.raises(TypeError, match='tunnel or a Group'):
        Queue().call('host1', echo, 1)


files = pytest.importorskip('chopsticks.files')


@pytest.mark.skipif(not hasattr(files, 'put'), reason='chopsticks.files has no put yet')
def test_put_then_call_in_order(a_b, tmp_path):
    source = tmp_path / 'script.txt'
    source.write_text('hello')
    target = str(tmp_path / 'copied.txt')
    queue = Queue()
    put = queue.put(a_b[0], str(source), target)
    read = queue.call(a_b[0], lambda p: open(p).read(), target)
    queue.run()
    assert put.value['size'] == 5
    assert read.value == 'hello'

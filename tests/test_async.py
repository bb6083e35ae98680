"""Group and Queue from a running asyncio event loop: awaited without blocking it."""
import asyncio
import os
import time

import pytest

from chopsticks import CallTimeout, Local
from chopsticks.group import ErrorResult, Group
from chopsticks.queue import Queue
from remote_helpers import echo


@pytest.fixture
def group():
    group = Group([Local('x%d' % i) for i in range(3)] + ['nonexistent.invalid'])
    yield group
    group.close()


async def ticking(coro):
    """Run ``coro`` while a task counts the loop's ticks every 10ms."""
    ticks = 0
    done = False

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(ticker())
    try:
        result = await coro
    finally:
        done = True
        await task
    return result, ticks


def test_acall_keeps_the_loop_running(group):
    async def main():
        await group.aconnect()
        return await ticking(group.acall(time.sleep, 0.5))

    result, ticks = asyncio.run(main())
    assert [h for h, _ in result.successful()] == ['x0', 'x1', 'x2']
    assert isinstance(result['nonexistent.invalid'], ErrorResult)
    assert ticks >= 5  # a blocked loop would not tick during the 0.5 s sleeps (it would count 1)


def test_connecting_does_not_block_the_loop_either(group):
    async def main():
        return await ticking(group.acall(os.getpid))

    result, ticks = asyncio.run(main())
    assert len(list(result.successful())) == 3
    assert ticks >= 2


def test_concurrent_group_calls_from_one_loop(group):
    async def main():
        await group.aconnect()
        return await asyncio.gather(*(group.acall(echo, i) for i in range(5)))

    results = asyncio.run(main())
    assert [r['x1'] for r in results] == [0, 1, 2, 3, 4]


def test_acall_timeout(group):
    async def main():
        return await group.acall(time.sleep, 30, timeout=0.3)

    result = asyncio.run(main())
    assert all(isinstance(v.exception, CallTimeout) for v in list(result.values())[:3])


def test_cancelling_the_awaiting_task(group):
    async def main():
        await group.aconnect()
        task = asyncio.ensure_future(group.acall(time.sleep, 30))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await group.acall(echo, 'after')

    assert asyncio.run(main())['x2'] == 'after'


def test_queue_arun(group):
    async def main():
        queue = Queue()
        x0 = group.tunnels[0]
        results = [queue.call(x0, echo, 1)]
        results[0].with_callback(lambda v: results.append(queue.call(group, echo, v + 1)))
        await queue.arun()
        return results

    results = asyncio.run(main())
    assert results[0].value == 1
    assert results[1].value['x2'] == 2


files = pytest.importorskip('chopsticks.files')


@pytest.mark.skipif(not hasattr(files, 'put'), reason='chopsticks.files has no put yet')
def test_aput_and_afetch(group, tmp_path):
    source = tmp_path / 'data.bin'
    source.write_bytes(os.urandom(100000))
    local_group = Group(group.tunnels[:2])

    async def main():
        put = await local_group.aput(str(source), str(tmp_path / 'copy.bin'))
        fetched = await local_group.afetch(str(tmp_path / 'copy.bin'),
                                           str(tmp_path / 'back-{host}.bin'))
        return put, fetched

    put, fetched = asyncio.run(main())
    put.raise_failures()
    fetched.raise_failures()
    assert (tmp_path / 'back-x1.bin').read_bytes() == source.read_bytes()

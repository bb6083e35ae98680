"""Tunnel.acall on a connected tunnel: a future asyncio also takes for a coroutine."""
import asyncio
import os
import threading

import pytest

from chopsticks import Local, RemoteException, TunnelClosed
from remote_helpers import echo, fail, sleep_then


@pytest.fixture(scope='module')
def tunnel():
    t = Local('aio')
    t.connect()
    yield t
    t.close()


def test_gather_of_many_acalls_in_order(tunnel):
    async def main():
        return await asyncio.gather(*(tunnel.acall(echo, i) for i in range(500)))

    assert asyncio.run(main()) == list(range(500))


def test_acall_is_taken_as_a_coroutine(tunnel):
    async def main():
        task = asyncio.create_task(tunnel.acall(echo, 'task'))
        return await task

    assert asyncio.run(main()) == 'task'
    assert asyncio.run(tunnel.acall(echo, 'run')) == 'run'


def test_errors_are_raised_where_awaited(tunnel):
    async def main():
        pending = tunnel.acall(echo, threading.Lock())  # cannot be pickled
        remote = tunnel.acall(fail, 'boom')
        with pytest.raises(TypeError, match='aio'):
            await pending
        with pytest.raises(RemoteException, match='boom'):
            await remote
        return await tunnel.acall(echo, 'still usable')

    assert asyncio.run(main()) == 'still usable'


def test_cancelled_acall_leaves_the_tunnel_usable(tunnel):
    async def main():
        slow = asyncio.ensure_future(tunnel.acall(sleep_then, 0.5, 'late'))
        await asyncio.sleep(0)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        return await tunnel.acall(echo, 'after')

    assert asyncio.run(main()) == 'after'
    assert tunnel.call(echo, 'sync after') == 'sync after'


def test_other_threads_calls_while_the_loop_reads(tunnel):
    """Blocking calls from another thread meanwhile get their own replies."""
    results = []

    def other_thread():
        results.extend(tunnel.call(echo, i) for i in range(50))

    async def main():
        thread = threading.Thread(target=other_thread)
        calls = [tunnel.acall(sleep_then, 0.01, i) for i in range(50)]
        thread.start()
        values = await asyncio.gather(*calls)
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        return values

    assert asyncio.run(main()) == list(range(50))
    assert results == list(range(50))
    assert tunnel.call_async(echo, 'broker').result(timeout=60) == 'broker'


def test_close_fails_awaited_acalls():
    t = Local('closing')
    t.connect()

    async def main():
        call = asyncio.ensure_future(t.acall(sleep_then, 30, 'never'))
        await asyncio.sleep(0.05)
        t.close()
        with pytest.raises(TunnelClosed, match='closing'):
            await call
        return await t.acall(os.getpid)  # reconnects in the background

    try:
        assert isinstance(asyncio.run(main()), int)
    finally:
        t.close()

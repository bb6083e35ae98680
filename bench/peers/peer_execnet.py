"""execnet (pytest-xdist's backend), in bench/.env-peers, with its defaults.

execnet has no function call and no import hook: a "call" is a
``remote_exec`` of source that answers on its channel, and the round-trip
rows use one channel message each way, its fastest path. Its ssh gateway
always adds ``-C`` (compression). The many-host row makes gateways from a
thread per host (``execnet.Group`` alone would connect them one by one).
"""
import os
from concurrent.futures import ThreadPoolExecutor

import _harness as h
from _harness import NotAvailable, Result, clock

import execnet
import execnet_remote

CALL = 'channel.send(None)'
CHUNK = 1 << 20


def spec(ctx, host=None, config=None, gw_id=None):
    s = 'ssh=-F %s %s//python=%s' % (config or ctx.ssh_config, host or ctx.host, ctx.remote_python)
    return s + ('//id=%s' % gw_id if gw_id else '')


def _connect_and_call(ctx, config=None):
    start = clock()
    gw = execnet.makegateway(spec(ctx, config=config))
    gw.remote_exec(CALL).receive()
    elapsed = clock() - start
    gw.exit()
    return elapsed


def connect_call(ctx):
    return Result(h.samples(ctx.repeat, lambda: _connect_and_call(ctx)), 's',
                  note='makegateway + remote_exec')


def _echo_channel(ctx, config=None):
    gw = execnet.makegateway(spec(ctx, config=config))
    channel = gw.remote_exec(execnet_remote)
    channel.send('echo')
    for _ in range(20):
        channel.send(None)
        channel.receive()
    return gw, channel


def _round_trip(channel, item=None):
    channel.send(item)
    return channel.receive()


def trivial_rtt(ctx):
    gw, channel = _echo_channel(ctx)
    try:
        return Result(h.samples(ctx.repeat, lambda: h.per_op(lambda: _round_trip(channel),
                                                             ctx.rtt_calls)), 's',
                      note='one channel message each way')
    finally:
        gw.exit()


def pipelined(ctx):
    gw, channel = _echo_channel(ctx)
    n = ctx.pipelined_calls

    def burst():
        start = clock()
        for _ in range(n):
            channel.send(None)
        for _ in range(n):
            channel.receive()
        return n / (clock() - start)

    try:
        burst()
        return Result(h.samples(ctx.repeat, burst), 'calls/s',
                      note='%d channel messages in flight' % n)
    finally:
        gw.exit()


def asyncio_gather(ctx):
    """execnet has no asyncio: its channel, as many messages in flight."""
    gw, channel = _echo_channel(ctx)
    n = ctx.gather_calls

    def burst():
        start = clock()
        for _ in range(n):
            channel.send(None)
        for _ in range(n):
            channel.receive()
        return n / (clock() - start)

    try:
        burst()
        return Result(h.samples(ctx.repeat, burst), 'calls/s',
                      note='%d channel messages in flight (no asyncio API)' % n)
    finally:
        gw.exit()


def echo_4mib(ctx):
    gw, channel = _echo_channel(ctx)
    data = os.urandom(ctx.echo_bytes)

    def once():
        if _round_trip(channel, data) != data:
            raise AssertionError('echo returned different bytes')

    try:
        once()
        return Result(h.samples(ctx.repeat, lambda: h.mb_per_s(
            2 * len(data), h.per_op(once, ctx.echo_rounds))), 'MB/s',
            note='channel message (ssh -C)')
    finally:
        gw.exit()


def files(ctx):
    """A chunked channel each way: execnet's RSync sends whole files per message."""
    gw = execnet.makegateway(spec(ctx))
    size, src = ctx.file_size, ctx.file_path
    remote = os.path.join(ctx.scratch, 'execnet-remote.bin')
    local = os.path.join(ctx.scratch, 'execnet-local.bin')

    def put_once():
        channel = gw.remote_exec(execnet_remote)
        channel.send('put')
        channel.send(remote)
        with open(src, 'rb') as f:
            for chunk in iter(lambda: f.read(CHUNK), b''):
                channel.send(chunk)
        channel.send(None)
        return channel.receive()

    def fetch_once():
        channel = gw.remote_exec(execnet_remote)
        channel.send('fetch')
        channel.send((src, CHUNK))
        with open(local, 'wb') as f:
            for chunk in iter(channel.receive, None):
                f.write(chunk)

    def once(fn, dst):
        seconds = h.timed(fn)
        h.check_copy(src, dst, size)
        h.remove(dst)
        return h.mb_per_s(size, seconds)

    put, fetch = [], []
    try:
        for _ in range(ctx.heavy_repeat):
            put.append(once(put_once, remote))
            fetch.append(once(fetch_once, local))
    finally:
        gw.exit()
    note = '1 MiB channel messages (ssh -C)'
    return {'put': Result(put, 'MB/s', note), 'fetch': Result(fetch, 'MB/s', note)}


def wan(ctx):
    if not ctx.wan_ssh_config:
        raise NotAvailable('no slowlink.py')
    connect = h.samples(ctx.wan_repeat, lambda: _connect_and_call(ctx, config=ctx.wan_ssh_config))
    gw, channel = _echo_channel(ctx, config=ctx.wan_ssh_config)
    try:
        rtt = h.samples(ctx.wan_repeat, lambda: h.per_op(lambda: _round_trip(channel),
                                                         ctx.wan_rtt_calls))
    finally:
        gw.exit()
    return {'wan_connect': Result(connect, 's'), 'wan_rtt': Result(rtt, 's'),
            'wan_import': NotAvailable('no import hook')}


def many_hosts(ctx):
    hosts = ctx.many_hosts
    group = None

    def connect_all(round_no):
        group = execnet.Group()
        specs = [spec(ctx, host=host, gw_id='r%d-%s' % (round_no, host)) for host in hosts]
        with ThreadPoolExecutor(len(hosts)) as pool:
            list(pool.map(group.makegateway, specs))
        group.remote_exec(CALL).receive_each()
        return group

    connect = []
    for i in range(ctx.heavy_repeat):
        if group is not None:
            group.terminate(timeout=5)
        start = clock()
        group = connect_all(i)
        connect.append(clock() - start)

    def call_all():
        group.remote_exec(CALL).receive_each()

    try:
        call = h.round_samples(ctx, call_all)
    finally:
        group.terminate(timeout=5)
    return {'many_connect': Result(connect, 's', note='makegateway from a thread per host'),
            'many_call': Result(call, 's', note='Group.remote_exec + receive_each')}


def local_connect(ctx):
    def once():
        start = clock()
        gw = execnet.makegateway('popen//python=%s' % ctx.local_python)
        gw.remote_exec(CALL).receive()
        elapsed = clock() - start
        gw.exit()
        return elapsed

    once()
    return Result(h.samples(ctx.local_repeat, once), 's')


if __name__ == '__main__':
    h.main(globals())

"""Fabric 3 (paramiko), in bench/.env-peers: connections and files only.

Fabric runs shell commands, not Python calls, so it appears in the rows where
a command is the natural unit (connect and run ``python3 -c pass``, many
hosts) and in the file rows (``Connection.put``/``get`` use SFTP). Each
Connection gets its own ``config.clone()`` (a shared Config accumulates
IdentityFile entries across hosts).
"""
import os

import _harness as h
from _harness import NotAvailable, Result, clock

from fabric import Config, Connection, ThreadingGroup


def config(path):
    return Config(runtime_ssh_path=path)


def connection(ctx, host=None, cfg=None):
    return Connection(host or ctx.host, config=config(cfg or ctx.ssh_config).clone())


def _connect_and_run(ctx, cfg=None):
    start = clock()
    c = connection(ctx, cfg=cfg)
    c.run('%s -c pass' % ctx.remote_python, hide=True, in_stream=False)
    elapsed = clock() - start
    c.close()
    return elapsed


def connect_call(ctx):
    return Result(h.samples(ctx.repeat, lambda: _connect_and_run(ctx)), 's',
                  note="Connection.run('python3 -c pass')")


def files(ctx):
    size, src = ctx.file_size, ctx.file_path
    remote = os.path.join(ctx.scratch, 'fabric-remote.bin')
    local = os.path.join(ctx.scratch, 'fabric-local.bin')
    c = connection(ctx)
    c.open()

    def once(fn, dst):
        seconds = h.timed(fn)
        h.check_copy(src, dst, size)
        h.remove(dst)
        return h.mb_per_s(size, seconds)

    put, fetch = [], []
    try:
        for _ in range(ctx.heavy_repeat):
            put.append(once(lambda: c.put(src, remote), remote))
            fetch.append(once(lambda: c.get(src, local), local))
    finally:
        c.close()
    return {'put': Result(put, 'MB/s', note='SFTP'), 'fetch': Result(fetch, 'MB/s', note='SFTP')}


def wan(ctx):
    if not ctx.wan_ssh_config:
        raise NotAvailable('no slowlink.py')
    connect = h.samples(ctx.wan_repeat, lambda: _connect_and_run(ctx, cfg=ctx.wan_ssh_config))
    return {'wan_connect': Result(connect, 's', note="Connection.run('python3 -c pass')"),
            'wan_rtt': NotAvailable('runs commands, not calls'),
            'wan_import': NotAvailable('runs commands, not calls')}


def many_hosts(ctx):
    group = None
    connect = []
    for _ in range(ctx.heavy_repeat):
        if group is not None:
            group.close()
        group = ThreadingGroup.from_connections(
            [connection(ctx, host=host) for host in ctx.many_hosts])
        start = clock()
        group.run('%s -c pass' % ctx.remote_python, hide=True, in_stream=False)
        connect.append(clock() - start)
    group.close()
    return {'many_connect': Result(connect, 's', note="ThreadingGroup.run('python3 -c pass')"),
            'many_call': NotAvailable('runs commands, not calls')}


if __name__ == '__main__':
    h.main(globals())

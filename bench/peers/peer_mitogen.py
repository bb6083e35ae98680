"""mitogen, in bench/.env-peers, with its defaults (ssh compression on).

Pointed at the benchmark's ssh_config with ``ssh_args=['-F', config]``; its
logging is left unconfigured (``mitogen.utils.log_to_file`` is never called).
mitogen has no group API: the many-host row connects from a thread per host,
which is how a mitogen user gets parallel connects.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import _harness as h
from _harness import NotAvailable, Result, clock

import mitogen.master
import mitogen.select
import mitogen.service
import remote_fns

broker = mitogen.master.Broker()
router = mitogen.master.Router(broker)


def ssh(ctx, host=None, config=None):
    return router.ssh(hostname=host or ctx.host, python_path=ctx.remote_python,
                      ssh_args=['-F', config or ctx.ssh_config])


def _connect_and_call(ctx, config=None):
    start = clock()
    context = ssh(ctx, config=config)
    context.call(remote_fns.noop)
    elapsed = clock() - start
    context.shutdown(wait=True)
    return elapsed


def connect_call(ctx):
    return Result(h.samples(ctx.repeat, lambda: _connect_and_call(ctx)), 's')


def _connected(ctx):
    context = ssh(ctx)
    for _ in range(20):
        context.call(remote_fns.noop)
    return context


def trivial_rtt(ctx):
    context = _connected(ctx)
    return Result(h.samples(ctx.repeat, lambda: h.per_op(lambda: context.call(remote_fns.noop),
                                                         ctx.rtt_calls)), 's')


def pipelined(ctx):
    context = _connected(ctx)
    n = ctx.pipelined_calls

    def burst():
        start = clock()
        receivers = [context.call_async(remote_fns.noop) for _ in range(n)]
        for recv in receivers:
            recv.get().unpickle()
        return n / (clock() - start)

    burst()
    return Result(h.samples(ctx.repeat, burst), 'calls/s',
                  note='%d call_async in flight' % n)


def echo_4mib(ctx):
    context = _connected(ctx)
    data = os.urandom(ctx.echo_bytes)

    def once():
        if context.call(remote_fns.echo, data) != data:
            raise AssertionError('echo returned different bytes')

    once()
    return Result(h.samples(ctx.repeat, lambda: h.mb_per_s(
        2 * len(data), h.per_op(once, ctx.echo_rounds))), 'MB/s')


def files(ctx):
    """put through FileService, as ansible_mitogen does; mitogen has no fetch."""
    context = _connected(ctx)
    size, src = ctx.file_size, ctx.file_path
    remote = os.path.join(ctx.scratch, 'mitogen-remote.bin')
    pool = mitogen.service.get_or_create_pool(router=router)
    service = mitogen.service.FileService(router)
    pool.add(service)
    service.register(src)
    put = []
    for _ in range(ctx.heavy_repeat):
        seconds = h.timed(context.call, remote_fns.mitogen_get_file, router.myself(), src, remote)
        h.check_copy(src, remote, size)
        h.remove(remote)
        put.append(h.mb_per_s(size, seconds))
    return {'put': Result(put, 'MB/s', note='FileService'),
            'fetch': NotAvailable('no fetch from a child')}


def wan(ctx):
    if not ctx.wan_ssh_config:
        raise NotAvailable('no slowlink.py')
    sys.path.insert(0, ctx.tree_dir)
    tree = __import__(ctx.tree_pkg)
    connect, rtt, imports = [], [], []
    for _ in range(ctx.wan_repeat):
        start = clock()
        context = ssh(ctx, config=ctx.wan_ssh_config)
        context.call(remote_fns.noop)
        connect.append(clock() - start)
        rtt.append(h.per_op(lambda: context.call(remote_fns.noop), ctx.wan_rtt_calls))
        start = clock()
        count = context.call(tree.entry)
        imports.append(clock() - start)
        context.shutdown(wait=True)
    return {
        'wan_connect': Result(connect, 's'),
        'wan_rtt': Result(rtt, 's'),
        'wan_import': Result(imports, 's', note='%d modules' % count),
    }


def wan_real(ctx):
    """Real PyPI packages the host lacks (real_imports.py), over the WAN link."""
    if not ctx.wan_ssh_config:
        raise NotAvailable('no slowlink.py')
    if not ctx.real_packages_dir:
        raise NotAvailable('the real packages could not be installed')
    sys.path.insert(0, ctx.real_packages_dir)
    import real_imports
    imports = []
    for _ in range(ctx.wan_repeat):
        context = router.ssh(hostname=ctx.host, python_path=ctx.real_python,
                             ssh_args=['-F', ctx.wan_ssh_config])
        context.call(remote_fns.noop)
        start = clock()
        count = context.call(real_imports.import_all)
        imports.append(clock() - start)
        context.shutdown(wait=True)
    return {'wan_import_real': Result(imports, 's', note='%d modules' % count)}


def many_hosts(ctx):
    hosts = ctx.many_hosts

    def connect_one(host):
        context = ssh(ctx, host=host)
        context.call(remote_fns.noop)
        return context

    def connect_all():
        with ThreadPoolExecutor(len(hosts)) as pool:
            return list(pool.map(connect_one, hosts))

    connect = []
    for i in range(ctx.heavy_repeat):
        start = clock()
        contexts = connect_all()
        connect.append(clock() - start)
        if i + 1 < ctx.heavy_repeat:
            for context in contexts:
                context.shutdown(wait=False)

    def call_all():
        select = mitogen.select.Select([c.call_async(remote_fns.noop) for c in contexts])
        for msg in select:
            msg.unpickle()

    call = h.round_samples(ctx, call_all)
    return {'many_connect': Result(connect, 's', note='router.ssh from a thread per host'),
            'many_call': Result(call, 's', note='call_async + mitogen.select.Select')}


def local_connect(ctx):
    def once():
        start = clock()
        context = router.local(python_path=ctx.local_python)
        context.call(remote_fns.noop)
        elapsed = clock() - start
        context.shutdown(wait=True)
        return elapsed

    once()
    return Result(h.samples(ctx.local_repeat, once), 's')


if __name__ == '__main__':
    h.main(globals())

"""chopsticks 1.0 from the package index (lordmauve/chopsticks), in bench/.env-peers.

1.0 takes no ssh_config and hard-codes the remote interpreter, so a subclass
adds ``-F config`` and points it at an interpreter that still has ``imp``
(removed in Python 3.12; its remote agent needs it). Functions are called from
a module, never from ``__main__``: 1.0's ``__main__`` serialiser reads
bytecode and breaks on controllers >= 3.11.
"""
import os
import sys
import warnings

warnings.simplefilter('ignore')  # imp, setDaemon: deprecation noise only

import _harness as h
from _harness import NotAvailable, Result, clock

import remote_fns
from chopsticks.group import Group
from chopsticks.tunnel import Local, SSHTunnel


def tunnel_class(ctx, config=None):
    class ConfiguredSSHTunnel(SSHTunnel):
        python3 = ctx.old_remote_python

        def cmd_args(self):
            args = super().cmd_args()
            return args[:1] + ['-F', config or ctx.ssh_config] + args[1:]
    return ConfiguredSSHTunnel


def tunnel(ctx, host=None, config=None):
    return tunnel_class(ctx, config)(host or ctx.host)


def _connect_and_call(ctx, config=None):
    start = clock()
    t = tunnel(ctx, config=config)
    t.call(remote_fns.noop)
    elapsed = clock() - start
    t.close()
    return elapsed


def connect_call(ctx):
    return Result(h.samples(ctx.repeat, lambda: _connect_and_call(ctx)), 's')


def _connected(ctx):
    t = tunnel(ctx)
    for _ in range(20):
        t.call(remote_fns.noop)
    return t


def trivial_rtt(ctx):
    t = _connected(ctx)
    try:
        return Result(h.samples(ctx.repeat, lambda: h.per_op(lambda: t.call(remote_fns.noop),
                                                             ctx.rtt_calls)), 's')
    finally:
        t.close()


def pipelined(ctx):
    raise NotAvailable('one call in flight per tunnel')


def echo_4mib(ctx):
    raise NotAvailable('returns JSON: cannot return bytes')


def files(ctx):
    t = _connected(ctx)
    size, src = ctx.file_size, ctx.file_path
    remote = os.path.join(ctx.scratch, 'c1-remote.bin')
    local = os.path.join(ctx.scratch, 'c1-local.bin')

    def once(fn, dst):
        seconds = h.timed(fn)
        h.check_copy(src, dst, size)
        h.remove(dst)
        return h.mb_per_s(size, seconds)

    put, fetch = [], []
    try:
        for _ in range(ctx.heavy_repeat):
            put.append(once(lambda: t.put(src, remote), remote))
            fetch.append(once(lambda: t.fetch(src, local), local))
    finally:
        t.close()
    return {'put': Result(put, 'MB/s'), 'fetch': Result(fetch, 'MB/s')}


def wan(ctx):
    if not ctx.wan_ssh_config:
        raise NotAvailable('no slowlink.py')
    sys.path.insert(0, ctx.tree_dir)
    tree = __import__(ctx.tree_pkg)
    connect, rtt, imports = [], [], []
    for _ in range(ctx.wan_repeat):
        start = clock()
        t = tunnel(ctx, config=ctx.wan_ssh_config)
        t.call(remote_fns.noop)
        connect.append(clock() - start)
        rtt.append(h.per_op(lambda: t.call(remote_fns.noop), ctx.wan_rtt_calls))
        start = clock()
        count = t.call(tree.entry)
        imports.append(clock() - start)
        t.close()
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

    class BareTunnel(tunnel_class(ctx, ctx.wan_ssh_config)):
        python3 = ctx.real_python  # 3.11: still has imp

    imports = []
    for _ in range(ctx.wan_repeat):
        t = BareTunnel(ctx.host)
        t.call(remote_fns.noop)
        start = clock()
        try:
            count = t.call(real_imports.import_all)
        except Exception as exc:  # noqa: BLE001 (its RemoteException)
            raise NotAvailable('importing requests fails: 1.0 serves no package data '
                               "(certifi's cacert.pem): %s" % str(exc).splitlines()[-1].strip())
        finally:
            t.close()
        imports.append(clock() - start)
    return {'wan_import_real': Result(imports, 's', note='%d modules' % count)}


def many_hosts(ctx):
    cls = tunnel_class(ctx)

    def call_all(group):
        result = group.call(remote_fns.noop)
        failures = list(result.failures())
        if failures:
            raise RuntimeError('%d hosts failed: %s' % (len(failures), failures[0]))

    connect = []
    for i in range(ctx.heavy_repeat):
        group = Group([cls(host) for host in ctx.many_hosts])
        start = clock()
        call_all(group)
        connect.append(clock() - start)
        if i + 1 < ctx.heavy_repeat:
            group.close()
    try:
        call = h.round_samples(ctx, lambda: call_all(group))
    finally:
        group.close()
    return {'many_connect': Result(connect, 's', note='Group(...).call'),
            'many_call': Result(call, 's', note='Group.call')}


def local_connect(ctx):
    class ConfiguredLocal(Local):
        python3 = ctx.local_python

    def once():
        start = clock()
        t = ConfiguredLocal()
        t.call(remote_fns.noop)
        elapsed = clock() - start
        t.close()
        return elapsed

    once()
    return Result(h.samples(ctx.local_repeat, once), 's')


if __name__ == '__main__':
    h.main(globals())

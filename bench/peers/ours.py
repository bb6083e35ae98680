"""Our column: chopsticks from this checkout, through its public API only.

Run with the project's interpreter (``python -m bench`` passes the transport,
``openssh`` or ``paramiko``, as an option). Parts that have not landed yet
(``put``/``fetch``, ``chopsticks.group``) are reported as n/a, not as errors.
"""
import gc
import importlib
import importlib.util
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import _harness as h
from _harness import NotAvailable, Result, clock

import remote_fns

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

try:
    from chopsticks import Local, Tunnel
except ImportError as exc:  # the core has not landed in this checkout
    Tunnel = Local = None
    MISSING = 'chopsticks core missing (%s)' % exc


def _need_core():
    if Tunnel is None:
        raise NotAvailable(MISSING)


# Looked up once, not in the timed connects that call tunnel().
_HAS_PARAMIKO = importlib.util.find_spec('paramiko') is not None


def _need_transport(ctx):
    if ctx.options['transport'] == 'paramiko' and not _HAS_PARAMIKO:
        raise NotAvailable('paramiko is not installed for %s: run the benchmark with the '
                           'python of a virtual environment where chopsticks is installed '
                           '(pip install -e .)' % sys.executable)


def tunnel(ctx, host=None, config=None, **options):
    _need_core()
    _need_transport(ctx)
    return Tunnel(host or ctx.host, ssh_config=config or ctx.ssh_config,
                  transport=ctx.options['transport'], python=ctx.remote_python, **options)


def _connect_and_call(ctx, **options):
    start = clock()
    t = tunnel(ctx, **options)
    t.call(remote_fns.noop)
    elapsed = clock() - start
    t.close()
    return elapsed


def connect_call(ctx):
    return Result(h.samples(ctx.repeat, lambda: _connect_and_call(ctx)), 's')


def reconnect(ctx):
    """Open a second tunnel to a host while a first one is connected."""
    openssh = ctx.options['transport'] == 'openssh'
    options = {'control_master': True} if openssh else {}
    try:
        first = tunnel(ctx, **options)
    except TypeError as exc:
        raise NotAvailable('control_master not accepted (%s)' % exc)
    cold_start = clock()
    first.call(remote_fns.noop)
    cold = clock() - cold_start
    try:
        warm = h.samples(ctx.repeat, lambda: _connect_and_call(ctx, **options))
    finally:
        first.close()
    note = 'control_master=True' if openssh else 'no control master for paramiko'
    return Result(warm, 's', note=note, extra={'cold (first tunnel)': [cold]})


def _connected(ctx, **kw):
    t = tunnel(ctx, **kw)
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
    t = _connected(ctx)
    n = ctx.pipelined_calls

    def burst():
        start = clock()
        futures = [t.call_async(remote_fns.noop) for _ in range(n)]
        for future in futures:
            future.result()
        return n / (clock() - start)

    try:
        burst()  # warm
        return Result(h.samples(ctx.repeat, burst), 'calls/s',
                      note='%d call_async futures in flight' % n)
    finally:
        t.close()


def fresh_rtt(ctx):
    """What a user's script meets: this process has just started, connects,
    and calls at once, with no warm-up call (one sample per process)."""
    t = tunnel(ctx)
    t.connect()
    try:
        return Result([h.per_op(lambda: t.call(len, 'abc'), ctx.fresh_calls)
                       for _ in range(ctx.repeat)], 's',
                      note='t.call(len, "abc") right after connect, in a new process')
    finally:
        t.close()


def asyncio_gather(ctx):
    """``asyncio.gather`` of many ``acall`` on one tunnel, taking turns with
    as many ``call_async`` in the same process (the note gives the ratio)."""
    import asyncio
    import statistics
    t = _connected(ctx)
    n = ctx.gather_calls

    def call_async_burst():
        start = clock()
        for future in [t.call_async(remote_fns.noop) for _ in range(n)]:
            future.result()
        return n / (clock() - start)

    async def gather_burst():
        start = clock()
        await asyncio.gather(*(t.acall(remote_fns.noop) for _ in range(n)))
        return n / (clock() - start)

    async def measure():
        call_async_burst()  # warm
        await gather_burst()
        gathered, plain = [], []
        for _ in range(ctx.repeat):
            plain.append(call_async_burst())
            gathered.append(await gather_burst())
        return gathered, plain

    try:
        gathered, plain = asyncio.run(measure())
    finally:
        t.close()
    ratio = statistics.median(gathered) / statistics.median(plain)
    return Result(gathered, 'calls/s', extra={'call_async': plain},
                  note='%.2fx call_async in the same process (%s/s)'
                       % (ratio, '{:,.0f}'.format(statistics.median(plain))))


def echo_4mib(ctx):
    t = _connected(ctx)
    data = os.urandom(ctx.echo_bytes)

    def once():
        if t.call(remote_fns.echo, data) != data:
            raise AssertionError('echo returned different bytes')

    try:
        once()
        return Result(h.samples(ctx.repeat, lambda: h.mb_per_s(
            2 * len(data), h.per_op(once, ctx.echo_rounds))), 'MB/s')
    finally:
        t.close()


def files(ctx):
    t = _connected(ctx)
    try:
        if not callable(getattr(t, 'put', None)) or not callable(getattr(t, 'fetch', None)):
            raise NotAvailable('Tunnel.put/fetch not implemented yet')
        size, src = ctx.file_size, ctx.file_path
        remote = os.path.join(ctx.scratch, 'ours-remote.bin')
        local = os.path.join(ctx.scratch, 'ours-local.bin')

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
        except (ImportError, NotImplementedError) as exc:  # issue 3 not landed yet
            raise NotAvailable('put/fetch not implemented yet (%s: %s)' % (type(exc).__name__, exc))
        return {'put': Result(put, 'MB/s'), 'fetch': Result(fetch, 'MB/s')}
    finally:
        t.close()


def wan(ctx):
    _need_core()
    if not ctx.wan_ssh_config:
        raise NotAvailable('no slowlink.py')
    sys.path.insert(0, ctx.tree_dir)
    tree = importlib.import_module(ctx.tree_pkg)  # a caller has imported what it calls
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
    _need_core()
    _need_transport(ctx)
    if not ctx.wan_ssh_config:
        raise NotAvailable('no slowlink.py')
    if not ctx.real_packages_dir:
        raise NotAvailable('the real packages could not be installed')
    sys.path.insert(0, ctx.real_packages_dir)
    import real_imports
    imports, trips = [], []
    for _ in range(ctx.wan_repeat):
        t = Tunnel(ctx.host, ssh_config=ctx.wan_ssh_config, transport=ctx.options['transport'],
                   python=ctx.real_python)
        t.call(remote_fns.noop)
        before = t.call(real_imports.requests_made)
        start = clock()
        count = t.call(real_imports.import_all)
        imports.append(clock() - start)
        trips.append(t.call(real_imports.requests_made) - before)
        t.close()
    return {'wan_import_real': Result(
        imports, 's', note='%d modules, %d import round trips besides the call' % (count, max(trips)),
        extra={'import round trips': trips})}


def many_hosts(ctx):
    _need_core()
    try:
        from chopsticks.group import Group
    except ImportError as exc:
        raise NotAvailable('chopsticks.group missing (%s)' % exc)

    def make_group():
        return Group([tunnel(ctx, host=host) for host in ctx.many_hosts])

    def call_all(group):
        result = group.call(remote_fns.noop)
        failures = list(result.failures())
        if failures:
            raise RuntimeError('%d hosts failed: %s' % (len(failures), failures[0]))

    connect = []
    for i in range(ctx.heavy_repeat):
        group = make_group()
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
    _need_core()

    def once():
        start = clock()
        t = Local(python=ctx.local_python)
        t.call(remote_fns.noop)
        elapsed = clock() - start
        t.close()
        return elapsed

    once()
    return Result(h.samples(ctx.local_repeat, once), 's')


def thousand(ctx):
    """A thousand Local hosts in one Group: connect + first call (failures
    counted), then rounds of one call to all of them; controller memory."""
    _need_core()
    from chopsticks.group import Group
    n = ctx.thousand_hosts
    gc.collect()
    rss0 = h.rss_bytes()
    group = Group([Local('local%d' % i, python=ctx.local_python) for i in range(n)], progress=False)
    try:
        start = clock()
        result = group.call(remote_fns.noop)
        connect = clock() - start
        failed = [str(e) for _, e in result.failures()]
        if failed:
            ctx.log('%d of %d hosts failed, e.g. %s' % (len(failed), n, failed[0]))
        gc.collect()
        per_host = (h.rss_bytes() - rss0) / n / 1e6

        def call_all():
            bad = sum(1 for _ in group.call(remote_fns.noop).failures())
            if bad:
                raise RuntimeError('%d of %d hosts failed a call' % (bad, n))

        call = h.samples(ctx.repeat, lambda: h.per_op(call_all, ctx.thousand_rounds))
    finally:
        group.close()
    return {
        'thousand_connect': Result([connect], 's', note='%d failed' % len(failed),
                                   extra={'failed': len(failed), 'hosts': n}),
        'thousand_call': Result(call, 's', note='Group.call, %d hosts' % n),
        'thousand_memory': Result([per_host], 'MB', note='RSS after connect, per host'),
    }


def memory(ctx):
    """Controller RSS and threads added by idle, connected Local tunnels."""
    _need_core()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = ctx.mem_tunnels
    warm = Local(python=ctx.local_python)  # libraries, broker threads: not per tunnel
    warm.call(remote_fns.noop)
    gc.collect()
    rss0, threads0 = h.rss_bytes(), h.thread_count()
    def open_one(_):
        t = Local(python=ctx.local_python)
        t.call(remote_fns.noop)
        return t

    tunnels = []
    start = clock()
    try:
        # Opening is not what this row measures: a few threads start the agents
        # sooner; they are gone before the second reading.
        with ThreadPoolExecutor(4) as pool:
            tunnels.extend(pool.map(open_one, range(n)))
        opened = clock() - start
        gc.collect()
        time.sleep(1.0)
        rss1, threads1 = h.rss_bytes(), h.thread_count()
    finally:
        for t in tunnels:
            t.close()
        warm.close()
    per_tunnel = (rss1 - rss0) / n / 1e6
    return Result([per_tunnel], 'MB', note='%d Local tunnels' % n, extra={
        'threads_added': threads1 - threads0, 'threads_total': threads1,
        'tunnels': n, 'open_seconds': opened})


def _deploy(ctx, task):
    """A whole deployment, one call per host: chopsticks' tasks, or the
    same steps hand-written (the ``hand-written`` column), run by
    ``deploy_ours.py`` in a fresh process as a user's script would be."""
    import json
    import subprocess
    _need_core()
    mode = ctx.options.get('deploy', 'tasks')
    spec_path = os.path.join(ctx.scratch, 'deploy-%s.json' % ctx.subject)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'deploy_ours.py')

    def run_once(hosts, root):
        with open(spec_path, 'w') as f:
            json.dump({'hosts': hosts, 'root': root, 'ssh_config': ctx.ssh_config,
                       'remote_python': ctx.remote_python}, f)
        proc = subprocess.run([sys.executable, script, mode, spec_path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
        if proc.returncode:
            raise RuntimeError('deploy_ours.py %s: %s' % (mode, proc.stderr.strip()[-2000:]))
        return {host: len(changed) for host, changed in json.loads(proc.stdout).items()}

    # The first connect of a run compiles the agent on the host (an empty
    # chopsticks.cache): not part of a deployment, and it would fall on
    # whichever column came first.
    warm = tunnel(ctx)
    warm.call(remote_fns.noop)
    warm.close()
    rows = h.deploy_rows(ctx, task, run_once)
    for result in rows.values():
        result.note = ('the five steps by hand (stdlib)' if mode == 'hand' else
                       'chopsticks_files/chopsticks_pkg tasks') + ' in one function, %s, one call per host through Queue' % result.note
    return rows


def deploy(ctx):
    return _deploy(ctx, 'deploy')


def deploy_many(ctx):
    return _deploy(ctx, 'deploy_many')


if __name__ == '__main__':
    h.main(globals())

"""A thousand Local hosts from one controller: connect, first call, call rounds.

usage: python bench/tools/thousand.py [hosts] [rounds] [--profile FILE]

Prints the connect + first call time and its failures, the median of
``rounds`` calls to all hosts, the controller's RSS and descriptors per host
and its CPU per round.  ``--profile FILE`` writes a cProfile of the call
rounds (controller thread) to FILE.  ``RELAYS=4`` alternates blocks of five
rounds between the direct group and the same number of hosts behind four
relays (a ``RelayedGroup``: one call per relay).
"""
import gc
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, os.path.join(REPO, 'bench', 'peers'), HERE]

from chopsticks.group import Group  # noqa: E402
from chopsticks.tunnel import Local  # noqa: E402
import remote_fns  # noqa: E402
from procstat import cpu_seconds  # noqa: E402


def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def rss_of(pid):
    with open('/proc/%d/statm' % pid) as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def fds():
    return len(os.listdir('/proc/self/fd'))


def set_relief_nap(seconds):
    import sys
    sys.modules['_chopsticks_agent'].RELIEF_NAP_MAX = seconds


def children_switches(pids):
    total = 0
    for pid in pids:
        for task in os.listdir('/proc/%d/task' % pid):
            try:
                with open('/proc/%d/task/%s/status' % (pid, task)) as f:
                    for line in f:
                        if line.startswith(('voluntary_ctxt', 'nonvoluntary_ctxt')):
                            total += int(line.split()[1])
            except OSError:
                pass
    return total


def compare_relays(direct, count, python, rounds, block=5):
    """Alternate blocks of rounds: one call to the direct group, then one call
    per relay through a RelayedGroup of as many hosts behind ``count`` relays."""
    from chopsticks.relaygroup import RelayedGroup
    n = len(direct)
    relays = [Local('relay%d' % r) for r in range(count)]
    fleet = RelayedGroup({relay: [Local('far%d' % i, python=python) for i in range(r, n, count)]
                          for r, relay in enumerate(relays)}, progress=False)
    start = time.perf_counter()
    cpu0 = time.process_time()
    first = fleet.call(remote_fns.noop)
    failures = list(first.failures())
    print('relayed: %d relays x %d hosts, connect + first call %.2fs (controller cpu %.2fs), failed %d%s' % (
        count, n // count, time.perf_counter() - start, time.process_time() - cpu0, len(failures),
        ('  e.g. %s' % failures[0][1]) if failures else ''))
    relay_pids = [relay.direct_connection.transport.pid() for relay in relays]
    print('controller fds %d, threads %d, rss %.0f MiB; relays rss %s MiB, fds %s' % (
        fds(), len(os.listdir('/proc/self/task')), rss() / 2**20,
        '/'.join('%.0f' % (rss_of(pid) / 2**20) for pid in relay_pids),
        '/'.join(str(len(os.listdir('/proc/%d/fd' % pid))) for pid in relay_pids)))
    stats = {'direct': ([], [], []), 'relayed': ([], [], [])}
    for b in range(rounds // block):
        label = ('direct', 'relayed')[b % 2]
        group = direct if label == 'direct' else fleet
        for _ in range(block):
            k0 = cpu_seconds(relay_pids)
            c0 = time.process_time()
            t0 = time.perf_counter()
            bad = sum(1 for _ in group.call(remote_fns.noop).failures())
            stats[label][0].append(time.perf_counter() - t0)
            stats[label][1].append(time.process_time() - c0)
            stats[label][2].append(cpu_seconds(relay_pids) - k0)
            if bad:
                print('%s round: %d failed' % (label, bad))
    med = statistics.median
    for label, (ts, cs, ks) in stats.items():
        print('%s: one call to %d hosts, median %.1f ms (min %.1f), controller process cpu %.1f ms, '
              'relays cpu %.1f ms (%d rounds)' % (label, n, med(ts) * 1e3, min(ts) * 1e3,
                                                 med(cs) * 1e3, med(ks) * 1e3, len(ts)))
    start = time.perf_counter()
    fleet.close()
    for relay in relays:
        relay.close()
    print('relayed close %.2fs' % (time.perf_counter() - start))


def compare_parallel(group, values, rounds, block=5):
    """Alternate blocks of rounds between max_parallel values."""
    stats = {v: ([], []) for v in values}
    for b in range(rounds // block):
        value = values[b % len(values)]
        group.max_parallel = value
        for _ in range(block):
            c0 = time.thread_time()
            t0 = time.perf_counter()
            group.call(remote_fns.noop)
            stats[value][0].append(time.perf_counter() - t0)
            stats[value][1].append(time.thread_time() - c0)
    for value, (ts, cs) in stats.items():
        print('max_parallel %d: round median %.1f ms (min %.1f), controller thread %.1f ms (%d rounds)' % (
            value, statistics.median(ts) * 1e3, min(ts) * 1e3, statistics.median(cs) * 1e3, len(ts)))


def compare_naps(group, pids, naps, rounds, block=5):
    """Alternate blocks of rounds between the agents' relief nap settings."""
    stats = {nap: {'t': [], 'cpu': [], 'kids': [], 'sw': []} for nap in naps}
    for b in range(rounds // block):
        nap = naps[b % len(naps)]
        group.call(set_relief_nap, nap).raise_failures()
        group.call(remote_fns.noop)
        k0, s0 = cpu_seconds(pids), children_switches(pids)
        for _ in range(block):
            c0 = time.thread_time()
            t0 = time.perf_counter()
            group.call(remote_fns.noop)
            stats[nap]['t'].append(time.perf_counter() - t0)
            stats[nap]['cpu'].append(time.thread_time() - c0)
        stats[nap]['kids'].append((cpu_seconds(pids) - k0) / block)
        stats[nap]['sw'].append((children_switches(pids) - s0) / block)
    med = statistics.median
    for nap, st in stats.items():
        print('relief nap max %.3f: round median %.1f ms, controller thread %.1f ms, agents cpu %.1f ms, '
              'agents context switches %.0f (%d rounds)' % (
                  nap, med(st['t']) * 1e3, med(st['cpu']) * 1e3, med(st['kids']) * 1e3, med(st['sw']),
                  len(st['t'])))


def broker_cpu():
    from chopsticks import broker
    b = broker.get_broker()
    tid = b.thread.native_id
    with open('/proc/self/task/%d/stat' % tid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def main(argv):
    args = [a for a in argv if not a.startswith('--')]
    profile = None
    if '--profile' in argv:
        profile = argv[argv.index('--profile') + 1]
        args.remove(profile)
    n = int(args[0]) if args else 1000
    rounds = int(args[1]) if len(args) > 1 else 20
    python = os.environ.get('PY', '/usr/bin/python3')
    gc.collect()
    rss0, fd0 = rss(), fds()
    group = Group([Local('l%d' % i, python=python) for i in range(n)], progress=False)
    start = time.perf_counter()
    cpu0 = time.process_time()
    result = group.call(remote_fns.noop)
    connect = time.perf_counter() - start
    connect_cpu = time.process_time() - cpu0
    failures = list(result.failures())
    print('hosts %d  connect+first call %.2fs (cpu %.2fs)  failed %d%s' % (
        n, connect, connect_cpu, len(failures), ('  e.g. %s' % failures[0][1]) if failures else ''))
    gc.collect()
    time.sleep(0.5)
    rss1, fd1 = rss(), fds()
    print('per host: rss %.0f KiB  fds %.2f  (total rss %.0f MiB, fds %d, threads %d)' % (
        (rss1 - rss0) / n / 1024, (fd1 - fd0) / n, rss1 / 2**20, fd1, len(os.listdir('/proc/self/task'))))
    gc_time = [0.0, 0]
    gc_start = [0.0]

    def on_gc(phase, info):
        if phase == 'start':
            gc_start[0] = time.perf_counter()
        elif info['generation'] == 2:
            gc_time[0] += time.perf_counter() - gc_start[0]
            gc_time[1] += 1
    gc.callbacks.append(on_gc)
    mode = os.environ.get('GC', '')
    if mode == 'freeze':
        gc.freeze()
    elif mode == 'off':
        gc.disable()
    print('gc objects tracked: %d  (GC=%s)' % (len(gc.get_objects()), mode or 'on'))
    times, cpus = [], []
    pids = [t.direct_connection.transport.pid() for t in group.tunnels]
    if os.environ.get('RELAYS'):
        compare_relays(group, int(os.environ['RELAYS']), python, rounds)
        group.close()
        return
    if os.environ.get('MP', '').startswith('alt:'):
        compare_parallel(group, [int(x) for x in os.environ['MP'][4:].split(',')], rounds)
        group.close()
        return
    if os.environ.get('NAP', '').startswith('alt:'):
        compare_naps(group, pids, [float(x) for x in os.environ['NAP'][4:].split(',')], rounds)
        group.close()
        return
    if os.environ.get('NAP'):
        group.call(set_relief_nap, float(os.environ['NAP'])).raise_failures()
        print('agents relief nap max', os.environ['NAP'])
    kids0 = cpu_seconds(pids)
    switches0 = children_switches(pids)
    broker0 = broker_cpu()
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile(time.thread_time) if os.environ.get('PROF_CPU') else cProfile.Profile()
    alternate = mode == 'alt'  # blocks of 5 rounds with the collector on, then off
    for i in range(rounds):
        if alternate:
            (gc.disable if (i // 5) % 2 else gc.enable)()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        r = group.call(remote_fns.noop)
        if prof:
            prof.disable()
        times.append(time.perf_counter() - t0)
        cpus.append(time.thread_time() - c0)
        bad = sum(1 for _ in r.failures())
        if bad:
            print('round failed on %d hosts' % bad)
    kids = (cpu_seconds(pids) - kids0) / rounds
    print('per round: children context switches %.0f' % ((children_switches(pids) - switches0) / rounds))
    print('per round: children cpu %.1f ms (%.1f us/host), broker thread cpu %.1f ms' % (
        kids * 1e3, kids / n * 1e6, (broker_cpu() - broker0) / rounds * 1e3))
    if alternate:
        for label, pick in (('gc on', 0), ('gc off', 1)):
            sel = [k for k in range(rounds) if (k // 5) % 2 == pick]
            print('  %s: median %.1f ms, cpu %.1f ms' % (label, statistics.median(times[k] for k in sel) * 1e3,
                                                      statistics.median(cpus[k] for k in sel) * 1e3))
    print('one call to %d hosts: median %.1f ms  min %.1f  max %.1f; caller-thread cpu median %.1f ms '
          '(%.1f us/host)' % (n, statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3,
                              statistics.median(cpus) * 1e3, statistics.median(cpus) / n * 1e6))
    print('full collections during the rounds: %d, %.1f ms each' % (
        gc_time[1], gc_time[0] / max(1, gc_time[1]) * 1e3))
    if prof:
        prof.dump_stats(profile)
    start = time.perf_counter()
    group.close()
    print('close %.2fs' % (time.perf_counter() - start))


if __name__ == '__main__':
    main(sys.argv[1:])

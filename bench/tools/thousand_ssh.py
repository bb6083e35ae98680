"""What each SSH host costs one controller: processes, descriptors, memory, CPU.

usage: python bench/tools/thousand_ssh.py [hosts ...] [--rounds N]

For each number of hosts, in turn: a loopback sshd (the tests' fixture, with
MaxStartups and MaxSessions raised so that it refuses nothing), a Group of
that many SSH tunnels, connect + first call, then N rounds of one call to
every host.  Prints, per host: processes (ssh clients, sshd, agents),
descriptors held by the controller, memory (PSS, so shared pages count
once) of each kind of process, and CPU per round of each kind (from
/proc/<pid>/stat: 10 ms ticks, summed over many processes).
"""
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, os.path.join(REPO, 'bench', 'peers')]

from chopsticks.group import Group  # noqa: E402
from chopsticks.testing.sshd import LoopbackSSHD  # noqa: E402
from chopsticks.tunnel import Tunnel  # noqa: E402
import remote_fns  # noqa: E402
from procstat import cpu_seconds  # noqa: E402

TICK = os.sysconf('SC_CLK_TCK')


def processes():
    """{pid: (ppid, comm, cpu seconds)} of every process."""
    out = {}
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index('(') + 1:text.rindex(')')]
        fields = text[text.rindex(')') + 2:].split()
        out[int(name)] = (int(fields[1]), comm, 0.0)
    return out


def descendants(procs, root):
    children = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, ()):
            out.append(child)
            todo.append(child)
    return out


def pss_kib(pid):
    try:
        with open('/proc/%d/smaps_rollup' % pid) as f:
            for line in f:
                if line.startswith('Pss:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def kinds(sshd_pid):
    """{kind: [pids]}: 'ssh' (our clients), 'sshd' (per-connection), 'agent', 'other'."""
    procs = processes()
    out = {'ssh': [], 'sshd': [], 'agent': [], 'other': []}
    for pid in descendants(procs, os.getpid()):
        if procs[pid][1] == 'ssh':
            out['ssh'].append(pid)
    for pid in descendants(procs, sshd_pid):
        comm = procs[pid][1]
        kind = 'sshd' if comm.startswith('sshd') else 'agent' if comm.startswith('python') else 'other'
        out[kind].append(pid)
    return out, procs


def cpu(pids, procs):
    return sum(procs[p][2] for p in pids if p in procs)


def measure(n, rounds):
    aliases = ['host%d' % i for i in range(n)]
    with LoopbackSSHD(aliases, extra_config=['MaxStartups 2000', 'MaxSessions 2000']) as sshd:
        os.environ.update(sshd.env())
        group = Group([Tunnel(a, python='/usr/bin/python3') for a in aliases], progress=False)
        fd0 = len(os.listdir('/proc/self/fd'))
        start = time.perf_counter()
        result = group.call(remote_fns.noop)
        connect = time.perf_counter() - start
        failures = [e for _, e in result.failures()]
        failed = len(failures)
        if failures:
            print('  e.g. %s' % str(failures[0])[:400])
        by_kind, procs = kinds(sshd._proc.pid)
        own = time.process_time()
        times = []
        before = {k: cpu_seconds(p) for k, p in by_kind.items()}
        c0 = time.process_time()
        for _ in range(rounds):
            t0 = time.perf_counter()
            group.call(remote_fns.noop)
            times.append(time.perf_counter() - t0)
        controller = (time.process_time() - c0) / rounds
        per_round = {k: (cpu_seconds(p) - before[k]) / rounds for k, p in by_kind.items()}
        fds = len(os.listdir('/proc/self/fd')) - fd0
        pss = {k: sum(pss_kib(p) for p in pids) for k, pids in by_kind.items()}
        print('%d hosts: connect + first call %.1fs (%d failed), round median %.1f ms (min %.1f)'
              % (n, connect, failed, statistics.median(times) * 1e3, min(times) * 1e3))
        print('  per host: processes ssh %.2f sshd %.2f agent %.2f other %.2f; controller fds %.2f'
              % tuple([len(by_kind[k]) / n for k in ('ssh', 'sshd', 'agent', 'other')] + [fds / n]))
        print('  per host PSS KiB: ssh %.0f sshd %.0f agent %.0f other %.0f'
              % tuple(pss[k] / n for k in ('ssh', 'sshd', 'agent', 'other')))
        print('  per round CPU ms: controller %.1f ssh %.1f sshd %.1f agent %.1f (per host us: '
              '%.0f %.0f %.0f %.0f); controller cpu for the connect %.2fs'
              % tuple([controller * 1e3] + [per_round[k] * 1e3 for k in ('ssh', 'sshd', 'agent')]
                      + [controller / n * 1e6] + [per_round[k] / n * 1e6 for k in ('ssh', 'sshd', 'agent')]
                      + [own]))
        sys.stdout.flush()
        group.close()


def main(argv):
    rounds = 20
    if '--rounds' in argv:
        i = argv.index('--rounds')
        rounds = int(argv[i + 1])
        del argv[i:i + 2]
    for n in [int(a) for a in argv] or [50, 100, 200]:
        measure(n, rounds)


if __name__ == '__main__':
    main(sys.argv[1:])

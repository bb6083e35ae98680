"""Two versions of chopsticks, one call to 48 hosts, alternated in one process.

The benchmark's "one call to 48 connected hosts" row swings 20-30% between
runs on two cores, far more than most changes move it.  This times both
versions in the same process, over the same loopback sshd, in alternating
blocks of rounds, so the machine's noise falls on both alike.  For each it
prints the round's median time and the controller thread's CPU per host
(``time.thread_time``: exact, where ``/proc`` counts 10 ms ticks), and how
many blocks each version won.

usage: python bench/tools/fanout_ab.py DIR_A DIR_B [blocks] [rounds per block]

Each DIR holds a ``chopsticks`` package: this checkout, or an older commit's
(``git archive REV chopsticks | tar -x -C /tmp/REV``).  Each version's
agent runs on its own 48 connections, so a change to the agent shows too.
Run it with the Python chopsticks is installed in (``.venv/bin/python``);
``N=30`` in the environment for another number of hosts.
"""
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def load(directory, name, scratch):
    """``DIR/chopsticks`` imported as the package ``name``: both versions in one process."""
    shutil.copytree(os.path.join(directory, 'chopsticks'), os.path.join(scratch, name))
    return importlib.import_module(name + '.tunnel'), importlib.import_module(name + '.group')


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    dirs = argv[:2]
    blocks = int(argv[2]) if len(argv) > 2 else 8
    rounds = int(argv[3]) if len(argv) > 3 else 150
    hosts = ['host%d' % i for i in range(1, int(os.environ.get('N', 48)) + 1)]
    scratch = tempfile.mkdtemp(prefix='fanout-ab-')
    sys.path[:0] = [scratch, REPO, os.path.join(REPO, 'bench', 'peers')]
    from chopsticks.testing.sshd import LoopbackSSHD
    import remote_fns
    try:
        with LoopbackSSHD(hosts) as sshd:
            os.environ.update(sshd.env())
            groups = []
            for label, directory in zip('AB', dirs):
                tunnel, group = load(directory, 'chopsticks_' + label.lower(), scratch)
                g = group.Group([tunnel.Tunnel(h, python='/usr/bin/python3') for h in hosts],
                                max_connect=8)
                g.call(remote_fns.noop).raise_failures()
                groups.append((label, g))
            times = {label: [] for label, _ in groups}
            for block in range(blocks):
                for label, g in (groups if block % 2 == 0 else groups[::-1]):
                    for _ in range(rounds // 10):
                        g.call(remote_fns.noop)
                    cpu, start = time.thread_time(), time.perf_counter()
                    for _ in range(rounds):
                        g.call(remote_fns.noop)
                    times[label].append(((time.perf_counter() - start) / rounds,
                                         (time.thread_time() - cpu) / rounds / len(hosts)))
            for label, directory in zip('AB', dirs):
                rows = times[label]
                print('%s %-30s round %.3f ms   controller %.2f µs per host   (%s)' % (
                    label, directory[-30:], statistics.median(r[0] for r in rows) * 1e3,
                    statistics.median(r[1] for r in rows) * 1e6,
                    ' '.join('%.1f' % (r[1] * 1e6) for r in rows)))
            wins = sum(1 for a, b in zip(times['A'], times['B']) if b[0] < a[0])
            print('B had the faster round in %d of %d blocks' % (wins, blocks))
            for _, g in groups:
                g.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
    main(sys.argv[1:])

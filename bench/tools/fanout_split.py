"""Where one call to 48 hosts spends its CPU: our agent against stand-ins.

A bare controller loop writes one prebuilt CALL frame to each of 48 ssh
connections and waits for every reply, in blocks of rounds that alternate
between three kinds of remote behind the same loopback sshd:

``agent``   chopsticks' own agent, connected by this checkout's ``Tunnel``;
``python``  a ten-line Python loop that unpickles the call, runs it and
            writes the reply: the least any Python agent can do;
``cat``     ``cat``, which echoes the frame: no Python at all.

For each kind it prints the round's median time and the CPU per call of the
``ssh`` clients, their ``sshd`` sessions and the remote processes, read
exactly from ``/proc/<pid>/task/*/schedstat`` (``/proc/<pid>/stat`` counts
10 ms ticks, too coarse for 48 processes of 15 µs calls).  The controller
loop is the same for all three, so a difference in ``ssh`` or ``sshd`` comes
from how our side starts or feeds them: that is how each ssh running in a
session of its own (Linux autogroup) was found.

usage: python bench/tools/fanout_split.py [blocks] [rounds per block]
(``.venv/bin/python``; ``N=30`` in the environment for another number of hosts.)
"""
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time

from procstat import comm, cpu_seconds, parent

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEERS = os.path.join(REPO, 'bench', 'peers')

STAND_IN = '''
import os, pickle, struct, sys
sys.path.insert(0, %r)
header = struct.Struct('<IIB')  # chopsticks.wire.HEADER
buf = bytearray(1 << 16)
while True:
    n = os.readv(0, [buf])
    if not n:
        break
    length, rid, op = header.unpack_from(buf, 0)
    fn, args, kwargs = pickle.loads(buf[header.size:header.size + length])
    fn(*args, **kwargs)
    os.write(1, header.pack(1, rid, 20) + b'N')  # RESULT, None
''' % PEERS


def session_of(remote_pid):
    """The sshd process serving the remote process (bash may sit between)."""
    pid = parent(remote_pid)
    while not comm(pid).startswith('sshd'):
        pid = parent(pid)
    return pid


def remotes_named(name, marker=b''):
    """The processes called ``name`` (with ``marker`` in their command line) that an sshd runs."""
    found = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            if comm(int(pid)) != name or marker not in open('/proc/%s/cmdline' % pid, 'rb').read():
                continue
            session_of(int(pid))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not under sshd (init's comm is not sshd: ValueError at pid 0)
        found.append(int(pid))
    return found


def main(argv):
    blocks = int(argv[0]) if argv else 6
    rounds = int(argv[1]) if len(argv) > 1 else 300
    hosts = ['host%d' % i for i in range(1, int(os.environ.get('N', 48)) + 1)]
    sys.path[:0] = [REPO, PEERS]
    from chopsticks.testing.sshd import LoopbackSSHD
    from chopsticks.tunnel import Tunnel
    from chopsticks import wire
    from chopsticks.serialize import dumps_call
    from chopsticks.transport import TakeResult
    import remote_fns
    payload = dumps_call(remote_fns.noop, (), {})
    scratch = tempfile.mkdtemp(prefix='fanout-split-')
    script = os.path.join(scratch, 'stand_in.py')
    with open(script, 'w') as f:
        f.write(STAND_IN)
    with LoopbackSSHD(hosts) as sshd:
        os.environ.update(sshd.env())
        kinds = {}
        tunnels = [Tunnel(h, python='/usr/bin/python3') for h in hosts]
        agents = [t.call(os.getpid) for t in tunnels]
        for t in tunnels:
            t.call(remote_fns.noop)  # its module is there from now on
            assert t._conn.transport.take_stdout() is TakeResult.TAKEN  # this loop reads the replies
        kinds['agent'] = ([(t._conn.transport.stdin, t._conn.transport.stdout.fileno()) for t in tunnels],
                          [t._conn.transport.proc.pid for t in tunnels], agents)
        for kind, command in (('python', ['/usr/bin/python3', script]), ('cat', ['cat'])):
            procs = []
            for host in hosts:
                for _ in range(5):  # sshd may drop a burst of logins
                    proc = subprocess.Popen(sshd.ssh_argv(host, *command), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
                    proc.stdin.write(wire.frame(1, wire.CALL, payload))
                    if proc.stdout.read(1):
                        proc.stdout.read(len(wire.frame(1, wire.CALL, payload)) - 1 if kind == 'cat' else 9)
                        break
                    proc.wait()
                    time.sleep(0.5)
                else:
                    raise RuntimeError('cannot start %s on %s' % (kind, host))
                procs.append(proc)
            remotes = remotes_named('python3', script.encode()) if kind == 'python' else remotes_named('cat')
            assert len(remotes) == len(hosts), (kind, len(remotes))
            kinds[kind] = ([(p.stdin.fileno(), p.stdout.fileno()) for p in procs], [p.pid for p in procs], remotes)
        groups = {kind: {'ssh': ssh, 'sshd': [session_of(p) for p in remotes], 'remote': remotes}
                  for kind, (_, ssh, remotes) in kinds.items()}
        rid = [10 ** 6]

        def one_round(pairs):
            rid[0] += 1
            frame = wire.frame(rid[0], wire.CALL, payload)
            poller = select.poll()
            waiting = set()
            for w, r in pairs:
                poller.register(r, select.POLLIN)
                waiting.add(r)
                os.write(w, frame)
            while waiting:
                for fd, _ in poller.poll(10000) or [(None, None)]:
                    if fd is None:
                        raise RuntimeError('%d hosts did not answer' % len(waiting))
                    try:
                        if not os.read(fd, 65536):
                            raise EOFError
                    except BlockingIOError:
                        continue
                    waiting.discard(fd)
                    poller.unregister(fd)

        results = {kind: [] for kind in kinds}
        order = list(kinds)
        for block in range(blocks):
            for kind in (order if block % 2 == 0 else order[::-1]):
                pairs = kinds[kind][0]
                for _ in range(rounds // 10):
                    one_round(pairs)
                before = {part: cpu_seconds(pids) for part, pids in groups[kind].items()}
                start = time.perf_counter()
                for _ in range(rounds):
                    one_round(pairs)
                wall = (time.perf_counter() - start) / rounds
                per_call = {part: (cpu_seconds(pids) - before[part]) / rounds / len(hosts) * 1e6
                            for part, pids in groups[kind].items()}
                results[kind].append((wall, per_call))
        print('per call, µs of CPU (medians of %d blocks of %d rounds)' % (blocks, rounds))
        for kind, rows in results.items():
            print('%-7s round %.3f ms   ssh %5.1f   sshd %5.1f   remote %5.1f' % (
                kind, statistics.median(r[0] for r in rows) * 1e3,
                *(statistics.median(r[1][part] for r in rows) for part in ('ssh', 'sshd', 'remote'))))
        for kind, (pairs, _, _) in kinds.items():
            if kind != 'agent':
                for w, _ in pairs:
                    os.close(w)
        for t in tunnels:
            t.close()


if __name__ == '__main__':
    main(sys.argv[1:])

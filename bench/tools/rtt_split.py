"""Where one round trip spends its time: ``t.call(len, 'abc')`` against stand-ins.

Through one loopback sshd, each repetition makes four new connections in
turn and times 1,000 round trips on each, right after its first echo (as the
``fresh_rtt`` row does):

``cat``     ``ssh host cat`` and 16 bytes: the benchmark's floor;
``bare``    a five-line Python loop on the host that unpickles
            ``(len, ('abc',))``, calls it and writes the pickled value back,
            driven by ``os.write``/``os.read`` here: the least any Python
            controller and agent can do;
``framed``  the same pair speaking our frames: the call pickled as
            ``dumps_call`` does, behind our 9-byte header with a request id,
            the int answered in our codec (``'i'`` and 8 bytes) behind a
            header, read here after a ``poll`` and decoded with
            ``codec.decode``: the least a protocol with request ids and a
            safe reply codec costs, with no threads, handlers or imports;
``ours``    a ``Tunnel`` of this checkout, ``t.call(len, 'abc')``.

It prints each one's median wall time per round trip, its ratio to ``cat``
in each repetition (sorted: these machines vary by 2x from one second to the
next, so only medians of many repetitions compare), and the CPU per round
trip of the controller (this process, every thread), its ``ssh`` client,
the ``sshd`` session and the far end (``cat``, or the Python on the host),
read from ``/proc/<pid>/task/*/schedstat``.  The chain is serial: the sum of
the four is most of the wall time, and a difference in ssh or sshd comes
from how fast the ends answer them (see bench/RESULTS.md, "The round trip as
a user meets it").

usage: python bench/tools/rtt_split.py [repetitions]
(``.venv/bin/python`` from the repository root.)
"""
import base64
import os
import pickle
import select
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from procstat import comm, cpu_seconds, parent  # noqa: E402

from chopsticks import codec, wire  # noqa: E402
from chopsticks.serialize import dumps_call  # noqa: E402
from chopsticks.testing.sshd import LoopbackSSHD  # noqa: E402
from chopsticks.tunnel import Tunnel  # noqa: E402

CALLS = 1000
BARE_AGENT = ('import os, pickle\n'
              'while True:\n'
              '    d = os.read(0, 65536)\n'
              '    if not d: break\n'
              '    fn, args = pickle.loads(d)\n'
              '    os.write(1, pickle.dumps(fn(*args)))\n')
FRAMED_AGENT = ('import os, pickle, struct\n'
                'header, i64 = struct.Struct("<IIB"), struct.Struct("<q")\n'
                'while True:\n'
                '    d = os.read(0, 65536)\n'
                '    if not d: break\n'
                '    n, rid, op = header.unpack_from(d, 0)\n'
                '    fn, args, kwargs = pickle.loads(d[header.size:])\n'
                '    value = b"i" + i64.pack(fn(*args, **kwargs))\n'
                '    os.write(1, header.pack(len(value), rid, %d) + value)\n' % wire.RESULT)
PROCESSES = ('controller', 'ssh', 'sshd', 'far end')


def descendants(pid):
    """``pid`` and every process below it."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                children.setdefault(parent(int(entry)), []).append(int(entry))
            except OSError:
                continue  # gone meanwhile
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], ()))
    return found


def timed(round_trip, daemon_pid):
    """Wall and CPU per call of CALLS round trips, by process kind."""
    me = os.getpid()
    kinds = {'controller': [me], 'ssh': [], 'sshd': [], 'far end': []}
    on_host = descendants(daemon_pid)  # (the daemon is a child of this process too)
    for pid in on_host[1:]:
        try:
            kinds['sshd' if comm(pid).startswith('sshd') else 'far end'].append(pid)
        except OSError:
            continue  # gone meanwhile
    kinds['ssh'] = [pid for pid in descendants(me)[1:] if pid not in on_host]
    before = {kind: cpu_seconds(pids) for kind, pids in kinds.items()}
    start = time.perf_counter()
    for _ in range(CALLS):
        round_trip()
    result = {'wall': (time.perf_counter() - start) / CALLS}
    for kind, pids in kinds.items():
        result[kind] = (cpu_seconds(pids) - before[kind]) / CALLS
    return result


def through_pipe(sshd, daemon_pid, command, message):
    proc = subprocess.Popen(sshd.ssh_argv('host1', *command), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, bufsize=0)
    w, r = proc.stdin.fileno(), proc.stdout.fileno()
    os.write(w, message)
    os.read(r, 100)  # connected once the first answer is back

    def round_trip():
        os.write(w, message)
        os.read(r, 100)
    try:
        return timed(round_trip, daemon_pid)
    finally:
        proc.stdin.close()
        proc.wait()


def framed_pair(sshd, daemon_pid):
    agent = '"import base64; exec(base64.b64decode(%r))"' % base64.b64encode(FRAMED_AGENT.encode()).decode()
    proc = subprocess.Popen(sshd.ssh_argv('host1', '/usr/bin/python3', '-c', agent),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    w, r = proc.stdin.fileno(), proc.stdout.fileno()
    os.set_blocking(r, False)
    poller = select.poll()
    poller.register(r, select.POLLIN)
    buf = bytearray(65536)
    rids = iter(range(1, 1 << 30))

    def round_trip():
        payload = dumps_call(len, ('abc',), {})
        os.write(w, wire.HEADER.pack(len(payload), next(rids), wire.CALL) + payload)
        poller.poll()
        n = os.readv(r, [buf])
        return codec.decode(bytes(buf[wire.HEADER.size:n]))
    assert round_trip() == 3  # connected once the first answer is back
    try:
        return timed(round_trip, daemon_pid)
    finally:
        proc.stdin.close()
        proc.wait()


def through_tunnel(daemon_pid):
    tunnel = Tunnel('host1', python='/usr/bin/python3')
    tunnel.connect()
    try:
        return timed(lambda: tunnel.call(len, 'abc'), daemon_pid)
    finally:
        tunnel.close()


def main():
    repetitions = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    bare = '"import base64; exec(base64.b64decode(%r))"' % base64.b64encode(BARE_AGENT.encode()).decode()
    runs = {'cat': [], 'bare': [], 'framed': [], 'ours': []}
    with LoopbackSSHD(aliases=('host1',)) as sshd:
        os.environ.update(sshd.env())
        daemon_pid = sshd._proc.pid  # type: ignore[attr-defined]
        for _ in range(repetitions):
            runs['cat'].append(through_pipe(sshd, daemon_pid, ['cat'], b'0123456789abcdef'))
            runs['bare'].append(through_pipe(sshd, daemon_pid, ['/usr/bin/python3', '-c', bare],
                                             pickle.dumps((len, ('abc',)))))
            runs['framed'].append(framed_pair(sshd, daemon_pid))
            runs['ours'].append(through_tunnel(daemon_pid))
    floor = statistics.median(r['wall'] for r in runs['cat'])
    print('medians of %d, µs per round trip; CPU per round trip by process' % repetitions)
    for name, results in runs.items():
        wall = statistics.median(r['wall'] for r in results)
        ratios = sorted(r['wall'] / cat['wall'] for r, cat in zip(results, runs['cat']))
        print('%-6s %4.0f (x%.2f)  ' % (name, wall * 1e6, wall / floor) + '  '.join(
            '%s %.0f' % (kind, statistics.median(r[kind] for r in results) * 1e6)
            for kind in PROCESSES))
        if name != 'cat':
            print('       x cat in each repetition: ' + ' '.join('%.2f' % x for x in ratios))


if __name__ == '__main__':
    main()

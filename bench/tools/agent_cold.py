"""What one trivial call costs the agent when its caches are cold.

In a one-call-to-48-hosts round the 144 other processes (ssh, sshd, the
other agents) run between two calls of an agent and leave its caches and
TLB cold; the agent then costs four to five times what the same call costs
back to back.  This copies 8 MiB between calls to reproduce that, and times
the agent's own path for one call (read the frame, run it inline, write the
reply to /dev/null), alternating the variants call by call in one process,
so the machine's noise falls on all of them alike.

usage: python3 bench/tools/agent_cold.py [DIR ...]

Each DIR holds an agent's sources (codec.py, wire.py, agent.py), e.g. the
repository's chopsticks/ or an older commit's:
``git archive REV chopsticks | tar -x -C /tmp/REV``.  Default: this
checkout's.  ``mini`` is a bare Python loop over the same frames, the floor.
Run it with the interpreter the hosts run (the benchmark uses /usr/bin/python3).
"""
import inspect
import os
import pickle
import statistics
import struct
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HEADER = struct.Struct('<IIB')  # wire.HEADER
CALL, RESULT = 1, 20            # wire.CALL, wire.RESULT


def noop():
    pass


def call_frame():
    # What the controller sends for ``tunnel.call(noop)``: (fn, args, kwargs)
    # pickled by reference (chopsticks.serialize.dumps_call does the same).
    payload = pickle.dumps((noop, (), {}), protocol=4)
    return HEADER.pack(len(payload), 7, CALL) + payload


def bare_loop(frame):
    r, w = os.pipe()
    out = os.open(os.devnull, os.O_WRONLY)
    buf = bytearray(1 << 18)

    def once(clock=time.perf_counter):
        os.write(w, frame)
        start = clock()
        os.readv(r, [buf])
        length, rid, _ = HEADER.unpack_from(buf, 0)
        fn, args, kwargs = pickle.loads(buf[HEADER.size:HEADER.size + length])
        fn(*args, **kwargs)
        os.write(out, HEADER.pack(1, rid, RESULT) + b'N')
        return clock() - start
    return once


def agent_loop(directory, frame):
    modules = {}
    for name in ('codec', 'wire', 'agent'):
        module = types.ModuleType('_chopsticks_' + name)
        sys.modules[module.__name__] = module  # the agent finds its siblings there
        with open(os.path.join(directory, name + '.py')) as f:
            source = f.read()
        exec(compile(source, '<%s %s>' % (directory, name), 'exec'), module.__dict__)
        modules[name] = module
    r, w = os.pipe()
    agent = modules['agent'].Agent(r, os.open(os.devnull, os.O_WRONLY), {})
    agent.relief_started = True  # no relief thread: it would only sleep here
    # Older agents passed the parser a view of what was read.
    takes_length = 'n' in inspect.signature(agent.parser.feed).parameters

    def once(clock=time.perf_counter):
        os.write(w, frame)
        start = clock()
        # Agent.read_frames, for one read:
        buf = agent.read_buffer
        n = os.readv(r, [buf])
        frames = agent.parser.feed(buf, n) if takes_length else agent.parser.feed(memoryview(buf)[:n])
        for rid, op, payload in frames:
            agent.inline_queue.append((rid, payload))
        agent.run_inline(agent.inline_queue)
        return clock() - start
    return once


def main(argv):
    sys.modules.setdefault('__main__', sys.modules[__name__])
    frame = call_frame()
    names = argv or [os.path.join(REPO, 'chopsticks')]
    variants = [(name, bare_loop(frame) if name == 'mini' else agent_loop(name, frame)) for name in names]
    junk = bytearray(8 << 20)
    for _, once in variants:
        for _ in range(300):
            once()
    hot = {name: statistics.median(once() for _ in range(20000)) for name, once in variants}
    cold = {name: [] for name, _ in variants}
    for _ in range(int(os.environ.get('ROUNDS', 10000))):
        for name, once in variants:
            bytes(junk)  # evicts the caches, as the other processes of a round do
            cold[name].append(once())
    print('%s, per call (µs):' % sys.executable)
    for name, _ in variants:
        print('  %-40s back to back %5.2f   cold %5.2f' % (name, hot[name] * 1e6, statistics.median(cold[name]) * 1e6))


if __name__ == '__main__':
    main(sys.argv[1:])

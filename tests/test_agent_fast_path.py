"""The agent's inlined fast path for a lone call (Agent.read_frames) writes
exactly the frames its general path writes (run_inline, run_call,
Channel.send_value).

The fast path was measured (a quarter less agent CPU per call, bench/RESULTS.md)
and is kept inlined, so nothing but this test keeps the two in step.  A real
agent runs in a child process with raw pipes: a call written alone takes the
fast path; the same call written in one write with another takes the general
path.  The replies are compared byte for byte, header included.
"""
import os
import select
import subprocess
import sys

import pytest

from chopsticks import bootstrap, codec, wire
from chopsticks.serialize import dumps_call

WAIT = 60.0  # seconds before a missing reply fails the test instead of hanging it

SMALL = 4096 - wire.HEADER.size  # the fast path's own write up to this size (CombiningWriter.SMALL)


CALLS = {
    'None': (getattr, (None, 'x', None)),
    'int': (len, (b'abc',)),
    'text': (str, ('some text',)),
    'nested': (list, ([1, 'a', (b'b', None), {'k': 2.5}],)),
    'bytes just below the small write': (bytes, (SMALL - 8,)),
    'bytes at the small write': (bytes, (SMALL - 5,)),
    'bytes just above the small write': (bytes, (SMALL + 20,)),
    'bytes past a pipe': (bytes, (70000,)),
    'several parts': (list, ([b'y' * 100000, 'z', b'w' * 300000],)),
    'a lambda, sent as source': (lambda n: b'L' * n, (5,)),
}


class RawAgent(object):
    """An agent in a child process, spoken to frame by frame."""

    def __init__(self):
        self.proc = subprocess.Popen(
            bootstrap.python_argv(sys.executable), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, bufsize=0)
        settings = {'host': 'fastpath', 'depth': 1, 'max_depth': 3, 'log_level': 30}
        self.proc.stdin.write(bootstrap.stdin_preamble(settings))
        self.buffer = b''
        rid, op, hello = self.read_frame()
        assert op == wire.HELLO, 'the agent did not start: op %d' % op
        self.version = tuple(codec.decode(hello[wire.HEADER.size:])['version'][:2])

    def write(self, data):
        self.proc.stdin.write(data)

    def read_frame(self):
        """The next frame, whole: (rid, op, its bytes with the header)."""
        size = wire.HEADER.size
        while True:
            if len(self.buffer) >= size:
                length, rid, op = wire.HEADER.unpack_from(self.buffer, 0)
                if len(self.buffer) >= size + length:
                    frame, self.buffer = self.buffer[:size + length], self.buffer[size + length:]
                    return rid, op, frame
            ready, _, _ = select.select([self.proc.stdout], [], [], WAIT)
            assert ready, 'no reply from the agent within %ss' % WAIT
            data = os.read(self.proc.stdout.fileno(), 1 << 20)
            assert data, 'the agent exited'
            self.buffer += data

    def replies(self, count):
        frames = {}
        while len(frames) < count:
            rid, op, frame = self.read_frame()
            frames[rid] = frame
        return frames

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture(scope='module')
def agent():
    raw = RawAgent()
    yield raw
    raw.close()


def _call_frame(agent, rid, fn, args):
    return wire.frame(rid, wire.CALL, dumps_call(fn, args, {}, agent.version))


@pytest.mark.parametrize('name', sorted(CALLS))
def test_a_lone_call_gets_the_frames_of_the_general_path(agent, name):
    fn, args = CALLS[name]
    call = _call_frame(agent, 7, fn, args)
    agent.write(call)  # alone in its read: the fast path
    fast = agent.replies(1)[7]
    # With another call in the same write the agent parses both and runs
    # them through run_inline: the general path.
    agent.write(call + _call_frame(agent, 8, len, (b'other',)))
    general = agent.replies(2)[7]
    assert wire.HEADER.unpack_from(fast, 0)[2] == wire.RESULT
    assert fast == general


def test_a_lone_call_that_raises_reports_what_the_general_path_reports(agent):
    # The traceback names the agent's own functions (read_frames, run_call),
    # which differ: everything else must match.
    call = _call_frame(agent, 7, int, ('not a number',))
    agent.write(call)
    fast = agent.replies(1)[7]
    agent.write(call + _call_frame(agent, 8, len, (b'other',)))
    general = agent.replies(2)[7]
    replies = []
    for frame in (fast, general):
        length, rid, op = wire.HEADER.unpack_from(frame, 0)
        assert (rid, op) == (7, wire.ERROR)
        info = codec.decode(frame[wire.HEADER.size:])
        replies.append((info['type'], info['msg'], info['traceback'].splitlines()[-1]))
    assert replies[0] == replies[1] == (
        'ValueError', "invalid literal for int() with base 10: 'not a number'",
        "ValueError: invalid literal for int() with base 10: 'not a number'")

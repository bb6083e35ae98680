"""A hostile remote: fuzz what the controller does with the bytes it receives.

Everything a remote sends goes through ``wire.FrameParser`` (framing),
``codec.decode`` (values) and ``Connection.feed`` (dispatch).  Whatever the
bytes, the only outcomes allowed are a value, a clean ``DecodeError`` /
``FrameError``, or, at the connection level, the tunnel closed with a
``ProtocolError``: never another exception, a hang, or memory out of
proportion to the bytes received.
"""
import importlib.util
import struct
import threading
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chopsticks import codec, wire
from chopsticks.connection import MAX_FRAME, Connection
from chopsticks.replies import CallHandler, IterHandler, StreamHandler
from chopsticks.errors import ProtocolError
from chopsticks.transport import NO_CAPABILITIES

from test_codec import VALUES

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# What a decoded value may cost in memory per byte received: the worst real
# case is a list of empty sets (~45x); anything beyond this is a bug.
MEMORY_PER_BYTE = 64

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.text(max_size=20), st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(st.one_of(st.integers(), st.text(max_size=5)), children, max_size=5),
        st.frozensets(st.integers(), max_size=5),
    ),
    max_leaves=15,
)
encodings = st.one_of(values.map(codec.encode), st.sampled_from([codec.encode(v) for v in VALUES
                                                                 if not isinstance(v, bytes)]))


def decode_or_refuse(data):
    """codec.decode's contract for untrusted bytes: a value or DecodeError."""
    try:
        return codec.decode(data)
    except codec.DecodeError:
        return None


# --- the codec ---------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_decode_or_refuse_cleanly(data):
    decode_or_refuse(data)


@FUZZ
@given(encodings, st.data())
def test_truncated_encodings_are_refused(data, draw):
    cut = draw.draw(st.integers(0, len(data) - 1))
    with pytest.raises(codec.DecodeError):
        codec.decode(data[:cut])


@FUZZ
@given(encodings, st.data())
def test_mutated_encodings_decode_or_refuse(data, draw):
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        pos = draw.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = draw.draw(st.integers(0, 255))
    decode_or_refuse(bytes(mutated))


@FUZZ
@given(encodings, st.binary(min_size=1, max_size=10))
def test_trailing_bytes_are_refused(data, tail):
    with pytest.raises(codec.DecodeError, match='trailing'):
        codec.decode(data + tail)


@pytest.mark.parametrize('tag', list(b'ltdSZsbyIDahMPW'))
def test_forged_huge_counts_are_refused_without_allocating(tag):
    data = bytes([tag]) + struct.pack('<I', 0xFFFFFFFF) + b'N' * 100
    tracemalloc.start()
    try:
        with pytest.raises(codec.DecodeError):
            codec.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize('opener', [b'l\x01\x00\x00\x00', b't\x01\x00\x00\x00',
                                    b'd\x01\x00\x00\x00N', b'Z\x01\x00\x00\x00'])
def test_deep_nesting_is_refused_quickly(opener):
    start = time.monotonic()
    for depth in (codec.MAX_DEPTH + 1, 10 ** 5, 10 ** 6):
        with pytest.raises(codec.DecodeError, match='nested'):
            codec.decode(opener * depth + b'N')
    assert time.monotonic() - start < 10  # generous: it is milliseconds


def test_nesting_up_to_the_limit_decodes():
    value = None
    for _ in range(codec.MAX_DEPTH - 1):
        value = [value]
    assert codec.decode(codec.encode(value)) == value


@settings(FUZZ, max_examples=25)
@given(st.lists(st.sampled_from([
    b'N', b'l\x00\x00\x00\x00', b'S\x00\x00\x00\x00', b'Z\x01\x00\x00\x00N', b'P\x01\x00\x00\x00a',
    b'W\x01\x00\x00\x00a', b'M\x01\x00\x00\x000', b'y\x00\x00\x00\x00', b'd\x00\x00\x00\x00',
    b'U' + b'\x01' * 16, b'i' + b'\x07' * 8, b'I\x01\x00\x00\x00\x01', b's\x01\x00\x00\x00x',
]), min_size=1, max_size=3), st.integers(1000, 5000))
def test_memory_stays_proportional_to_input(items, n):
    body = b''.join(items[i % len(items)] for i in range(n))
    data = b'l' + struct.pack('<I', n) + body
    tracemalloc.start()
    try:
        decode_or_refuse(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= MEMORY_PER_BYTE * len(data) + (64 << 10)


# --- framing -------------------------------------------------------------------------

def frames_strategy():
    return st.lists(st.tuples(st.integers(0, 2 ** 32 - 1), st.integers(0, 255),
                              st.binary(max_size=300)), max_size=20)


def split_points(draw, total):
    return sorted(draw.draw(st.lists(st.integers(0, total), max_size=12)))


@FUZZ
@given(frames_strategy(), st.data())
def test_frames_survive_any_chunking(frames, draw):
    assert fed_in_pieces(wire.FrameParser(1 << 16), frames, draw) == frames


def fed_in_pieces(parser, frames, draw):
    """What ``parser`` makes of ``frames`` framed and fed in pieces cut anywhere."""
    stream = b''.join(wire.frame(rid, op, payload) for rid, op, payload in frames)
    got = []
    last = 0
    for cut in split_points(draw, len(stream)) + [len(stream)]:
        got.extend(parser.feed(stream[last:cut]))
        last = cut
    return got


@FUZZ
@given(st.binary(max_size=32), frames_strategy(), st.data())
def test_only_the_first_frame_is_held_to_first_max(first, frames, draw):
    """The controller's parser holds the HELLO, its first frame, to a few KB;
    the frames after it may be as big as any, however the reads fall (a
    first call's large reply may come in the HELLO's read)."""
    frames = [(0, wire.HELLO, first), (1, wire.RESULT, b'r' * 1000)] + frames
    parser = wire.FrameParser(1 << 16, first_max=32, first_name='a HELLO')
    assert fed_in_pieces(parser, frames, draw) == frames
    bloated = wire.FrameParser(1 << 16, first_max=32, first_name='a HELLO')
    with pytest.raises(wire.FrameError, match='a HELLO of 33 bytes'):
        bloated.feed(wire.frame(0, wire.HELLO, b'x' * 33)[:20])  # refused from its header


@FUZZ
@given(frames_strategy(), st.data())
def test_a_parser_reads_big_frames_in_place(frames, draw):
    """The agent's reader: a big frame is read straight into the buffer
    ``room()`` offers, in reads of any size, mixed with fed ones."""
    stream = b''.join(wire.frame(rid, op, payload) for rid, op, payload in frames)
    direct_read_min = wire.DIRECT_READ_MIN
    wire.DIRECT_READ_MIN = 40  # so that small fuzzed frames take that path too
    try:
        parser = wire.FrameParser(1 << 16, preallocate=1 << 16)
        got = []
        pos = 0
        while pos < len(stream):
            n = min(draw.draw(st.integers(1, 400)), len(stream) - pos)
            room = parser.room()
            if room is None:
                got.extend(parser.feed(stream[pos:pos + n]))
            else:
                n = min(n, len(room))
                room[:n] = stream[pos:pos + n]
                got.extend(parser.filled(n))
            pos += n
    finally:
        wire.DIRECT_READ_MIN = direct_read_min
    assert got == frames and parser.room() is None


def test_a_big_frame_is_read_into_its_own_buffer():
    payload = bytes(range(256)) * 1024
    stream = wire.frame(7, wire.DATA, payload)
    parser = wire.FrameParser(1 << 20, preallocate=1 << 20)
    assert parser.feed(stream[:1000]) == []
    room = parser.room()
    assert len(room) == len(stream) - 1000
    room[:] = stream[1000:]
    assert parser.filled(len(room)) == [(7, wire.DATA, payload)]
    wary = wire.FrameParser(1 << 20, preallocate=len(payload) - 1)  # too big to allocate ahead
    wary.feed(stream[:1000])
    assert wary.room() is None and len(wary.buf) == 1000


@FUZZ
@given(st.binary(max_size=3000), st.data())
def test_random_streams_frame_or_refuse(stream, draw):
    parser = wire.FrameParser(1024)
    last = 0
    try:
        for cut in split_points(draw, len(stream)) + [len(stream)]:
            for rid, op, payload in parser.feed(stream[last:cut]):
                assert len(payload) <= 1024
            last = cut
    except wire.FrameError:
        return
    # nothing buffered beyond one incomplete frame, which is within the limit
    assert len(parser.buf) < wire.HEADER.size + 1024


def test_oversized_header_is_refused_before_buffering():
    parser = wire.FrameParser(MAX_FRAME)
    with pytest.raises(wire.FrameError, match='exceeds the limit'):
        parser.feed(struct.pack('<IIB', MAX_FRAME + 1, 1, wire.RESULT))


def test_a_frame_arriving_a_byte_at_a_time_is_linear():
    # A frame announced as large and dribbled in must not cost a rescan per byte.
    payload = codec.encode(b'x' * 200000)
    stream = wire.frame(1, wire.RESULT, payload)
    parser = wire.FrameParser(MAX_FRAME)
    start = time.monotonic()
    for i in range(0, len(stream), 7):
        frames = parser.feed(stream[i:i + 7])
    assert frames == [(1, wire.RESULT, payload)]
    assert time.monotonic() - start < 10  # generous; quadratic would take minutes


# --- the connection: dispatch of hostile frames ----------------------------------------

class SinkTransport(object):
    """Where the controller's frames go in these tests: nowhere (no remote)."""

    capabilities = NO_CAPABILITIES

    def __init__(self):
        self.closed = False
        self.written = 0

    def start(self, conn):
        pass

    def write(self, parts):
        self.written += sum(len(p) for p in parts)

    def close(self):
        self.closed = True

    def writable_now(self):
        return True

    def write_nowait(self, parts):  # takes nothing now: a helper thread write()s it
        return wire.byte_views(parts)

    def wide_pipe(self, direction):
        return wire.WidePipe(None)

    def kill(self):
        self.closed = True


def connected(host='fuzzed'):
    conn = Connection(host, SinkTransport())
    conn.feed(wire.frame(0, wire.HELLO, codec.encode({  # as an agent starts
        'pid': 1, 'python': 'python3', 'version': (3, 11, 0), 'platform': 'linux',
        'hostname': host, 'magic': importlib.util.MAGIC_NUMBER})))
    assert conn.remote is not None
    handlers = {1: CallHandler(conn, 'call'), 2: IterHandler(conn, 'iter'),
                3: StreamHandler(conn, 'stream')}
    conn.pending.update(handlers)
    return conn, handlers


ALL_OPS = sorted(wire.OP_NAMES)
frame_payloads = st.one_of(st.binary(max_size=200), encodings,
                           values.map(lambda v: codec.encode(('module', v))),
                           st.sampled_from([codec.encode({'name': 'x', 'levelno': 30, 'msg': 'm'}),
                                            codec.encode({'name': 1, 'levelno': 'x'}),
                                            codec.encode({'type': 'E', 'msg': 'm'}),
                                            codec.encode(('data', '/etc/passwd')),
                                            codec.encode(-(10 ** 9)), codec.encode(10 ** 5000)]))
hostile_frames = st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4, 2 ** 32 - 1]),
                                    st.one_of(st.sampled_from(ALL_OPS), st.integers(0, 255)),
                                    frame_payloads), min_size=1, max_size=12)


@settings(FUZZ, max_examples=80)
@given(hostile_frames, st.data())
def test_connection_feed_only_ever_closes_with_protocol_error(frames, draw):
    conn, handlers = connected()
    stream = b''.join(wire.frame(rid, op, payload) for rid, op, payload in frames)
    last = 0
    for cut in split_points(draw, len(stream)) + [len(stream)]:
        conn.feed(stream[last:cut])  # must not raise, whatever the bytes
        last = cut
    if conn.closed:
        assert isinstance(conn.error, ProtocolError)
        assert '[fuzzed]' in str(conn.error)
        # every pending call was answered or failed: nothing waits forever
        assert handlers[1].future.done() and handlers[3].future.done()
        assert handlers[2].items
    conn.close()


@FUZZ
@given(st.binary(max_size=500))
def test_connection_feed_of_random_bytes(data):
    conn, _ = connected()
    conn.feed(data)
    assert not conn.closed or isinstance(conn.error, ProtocolError)
    conn.close()


def test_garbage_after_a_valid_result_fails_the_rest_not_the_answered():
    conn, handlers = connected()
    conn.feed(wire.frame(1, wire.RESULT, codec.encode('fine')))
    conn.feed(b'\xff' * 20)
    assert handlers[1].future.result(0) == 'fine'
    assert conn.closed and isinstance(conn.error, ProtocolError)
    with pytest.raises(ProtocolError, match='fuzzed'):
        handlers[3].future.result(0)


def test_oversized_frame_through_connection_is_a_protocol_error():
    conn, handlers = connected()
    conn.feed(struct.pack('<IIB', 0xFFFFFFFF, 1, wire.RESULT))
    assert conn.closed and 'exceeds the limit' in str(conn.error)
    assert len(conn.parser.buf) < 64


def test_unsolicited_and_late_replies_are_ignored():
    conn, handlers = connected()
    conn.feed(wire.frame(999, wire.RESULT, codec.encode(1)) + wire.frame(999, wire.PONG)
              + wire.frame(5, wire.END) + wire.frame(6, wire.CREDIT, codec.encode(3)))
    assert not conn.closed
    conn.feed(wire.frame(1, wire.RESULT, codec.encode(2)))
    assert handlers[1].future.result(0) == 2
    conn.close()


def test_many_import_requests_do_not_block_the_reader():
    """IMPORT is served off the broker thread: a burst (up to the cap on
    requests waiting, see the import-flood test) only queues work."""
    from chopsticks.connection import IMPORTS_IN_FLIGHT
    conn, _ = connected()
    count = IMPORTS_IN_FLIGHT - 100
    requests = b''.join(wire.frame(i, wire.IMPORT, codec.encode(('data', '/etc/shadow')))
                        for i in range(count))
    start = time.monotonic()
    conn.feed(requests)
    assert time.monotonic() - start < 10
    assert not conn.closed
    deadline = time.monotonic() + 30
    while conn.transport.written < count * wire.HEADER.size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert conn.transport.written >= count * wire.HEADER.size  # every one answered
    conn.close()


def test_concurrent_feed_and_close_do_not_raise():
    errors = []
    for _ in range(50):
        conn, _ = connected()
        payload = wire.frame(1, wire.ITEM, codec.encode(list(range(100)))) * 50

        def feed():
            try:
                conn.feed(payload)
            except Exception as e:  # pragma: no cover - the assertion reports it
                errors.append(e)
        t = threading.Thread(target=feed)
        t.start()
        conn.close()
        t.join()
    assert not errors


def test_hostile_logger_names_cannot_grow_the_controller():
    """Every logger lives as long as the process, with a placeholder per dotted
    prefix: a 100 KB name of 16,000 parts used to cost 700 MB."""
    import logging
    conn, _ = connected('lognames')
    long_name = '.'.join('x%d' % i for i in range(16000))
    before = len(logging.Logger.manager.loggerDict)
    tracemalloc.start()
    try:
        conn.feed(wire.frame(0, wire.LOG, codec.encode(
            {'name': long_name, 'levelno': 10, 'msg': 'long'})))
        for i in range(3000):  # many distinct names
            conn.feed(wire.frame(0, wire.LOG, codec.encode(
                {'name': 'flood.n%d' % i, 'levelno': 10, 'msg': 'many'})))
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert not conn.closed
    assert long_name not in logging.Logger.manager.loggerDict
    assert len(logging.Logger.manager.loggerDict) - before <= 1002
    assert grown < 16 << 20
    conn.close()


def test_ordinary_logger_names_are_kept(caplog):
    import logging
    conn, _ = connected('lognames')
    with caplog.at_level(logging.INFO):
        conn.feed(wire.frame(0, wire.LOG, codec.encode(
            {'name': 'myapp.db', 'levelno': logging.WARNING, 'msg': 'slow query'})))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not caplog.records:
            time.sleep(0.02)
    [record] = [r for r in caplog.records if r.name == 'myapp.db']
    assert record.host == 'lognames' and 'slow query' in record.getMessage()
    conn.close()


def test_import_flood_from_a_remote_that_does_not_read_is_cut_off():
    """A remote that asks for modules without ever reading the answers: the
    requests waiting on it are capped, the tunnel is closed with a
    ProtocolError, and closing does not wait for the stuck answer writes."""
    conn, handlers = connected('importflood')
    unblock = threading.Event()

    def stuck_write(parts):  # the host stopped reading: the pipe is full
        unblock.wait()
        raise BrokenPipeError(32, 'Broken pipe')
    conn.transport.write = stuck_write
    conn.transport.kill = unblock.set  # what killing the real transport does
    requests = b''.join(wire.frame(i, wire.IMPORT, codec.encode(('module', 'nosuch%d' % (i % 7))))
                        for i in range(50000))
    tracemalloc.start()
    try:
        for i in range(0, len(requests), 1 << 16):
            conn.feed(requests[i:i + (1 << 16)])
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        unblock.set()
    assert conn.closed and isinstance(conn.error, ProtocolError)
    assert 'import requests waiting' in str(conn.error) and '[importflood]' in str(conn.error)
    assert handlers[1].future.done()
    assert held < 16 << 20

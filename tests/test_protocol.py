"""A remote that sends garbage is cut off cleanly; the controller carries on."""
import os
import struct

import pytest

from chopsticks import ConnectError, Local, ProtocolError, SubprocessTunnel, TunnelClosed, wire
from remote_helpers import echo


def write_raw_to_controller(data):
    import sys
    agent = sys.modules['_chopsticks_agent'].agent
    with agent.channel.lock:
        os.write(agent.channel.fd, data)


def test_garbage_frame_closes_only_that_tunnel():
    bad, good = Local(), Local()
    try:
        good.call(echo, 1)
        # header for a 5-byte RESULT whose payload is not valid codec
        frame = struct.pack('<IIB', 5, 99999, 20) + b'\xff\xff\xff\xff\xff'
        with pytest.raises(TunnelClosed) as info:
            bad.call(write_raw_to_controller, frame + struct.pack('<IIB', 0, 1, 20))
        assert 'localhost' in str(info.value)
        assert good.call(echo, 2) == 2
        assert bad.call(echo, 3) == 3  # reconnected
    finally:
        bad.close()
        good.close()


def test_oversized_frame_is_refused_without_allocating():
    t = Local()
    try:
        with pytest.raises(ProtocolError) as info:
            t.call(write_raw_to_controller, struct.pack('<IIB', 0xFFFFFFF0, 1, 20))
        assert 'exceeds the limit' in str(info.value)
    finally:
        t.close()


class NotAnAgent(SubprocessTunnel):
    """A 'host' that answers the bootstrap with noise."""

    def python_args(self):
        return ['/bin/sh', '-c', 'head -c 100 >/dev/null; printf "HTTP/1.1 400 Bad Request\\r\\n\\r\\n"; sleep 5']


def test_noise_instead_of_an_agent_is_a_connect_error():
    with pytest.raises(ConnectError) as info:
        NotAnAgent('noisy', connect_timeout=10).call(echo, 1)
    assert 'noisy' in str(info.value)
    assert 'invalid' in str(info.value) or 'exceeds' in str(info.value)


def test_a_corked_writer_holds_frames_in_order_until_uncorked_or_past_its_limit():
    # The agent corks its writer while it runs a batch of calls, so that
    # their replies leave in one write; nothing may be lost or reordered.
    r, w = os.pipe()
    os.set_blocking(r, False)

    def written():
        try:
            return os.read(r, 1 << 16)
        except BlockingIOError:
            return b''

    try:
        writer = wire.CombiningWriter(w, limit=10)
        writer.write([b'a'])
        writer.cork()
        writer.write([b'b'])
        writer.write_frame(b'c')
        writer.write([b'd', b'e'])
        assert written() == b'a'
        writer.uncork()
        assert written() == b'bcde'
        writer.uncork()  # nothing held: nothing written
        assert written() == b''
        writer.write_frame(b'f')
        assert written() == b'f'
        writer.cork()
        for part in (b'12345', b'67890', b'xy'):
            writer.write([part])
        assert written() == b''
        writer.write([b'z'])  # more than the limit held: all of it goes
        assert written() == b'1234567890xyz'
        writer.uncork()
        assert written() == b''
    finally:
        os.close(r)
        os.close(w)


def test_a_writer_whose_reader_is_gone_drops_what_it_holds_and_raises_from_then_on():
    r, w = os.pipe()
    writer = wire.CombiningWriter(w)
    writer.cork()
    writer.write([b'held'])
    os.close(r)
    try:
        with pytest.raises(BrokenPipeError):
            writer.uncork()
        for write in (lambda: writer.write_frame(b'x'), lambda: writer.write([b'y'])):
            with pytest.raises(BrokenPipeError):
                write()
        assert writer.queue == [] and not writer.writing
    finally:
        os.close(w)

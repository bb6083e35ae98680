"""Replies a hijacked host can craft with the real encoder: decoding them
costs the controller CPU linear in their size and a bounded amount of memory
per byte, and what comes back can be printed."""
import pytest

from chopsticks import Local, codec
from chopsticks.errors import ChopsticksError


def colliding_dict(count):
    """A reply whose int keys all hash to 0: building it is quadratic.  The
    host never builds it: a dict subclass hands the encoder its items."""
    class Forged(dict):
        def __len__(self):
            return count

        def items(self):
            return ((k * ((1 << 61) - 1), None) for k in range(1, count + 1))
    return Forged()


def empty_sets(count):
    return [set() for _ in range(count)]


def lone_surrogates():
    return {'name': 'evil\udc80\ud800name', 'ok': 'plain'}


def test_hash_collision_reply_is_refused_and_the_tunnel_recovers():
    with Local('collider') as tunnel:
        with pytest.raises(ChopsticksError) as info:
            tunnel.call(colliding_dict, 40000, timeout=60)
        message = str(info.value)
        assert '[collider]' in message and 'hash' in message, message
        assert tunnel.call(len, 'still works') == 11


def test_reply_of_empty_sets_is_refused_for_its_memory():
    """An empty set costs 224 bytes for its 5 bytes on the wire."""
    with Local('inflater') as tunnel:
        with pytest.raises(ChopsticksError) as info:
            tunnel.call(empty_sets, 400000, timeout=60)
        message = str(info.value)
        assert '[inflater]' in message and 'memory' in message, message


def test_large_honest_replies_still_decode():
    with Local('honest') as tunnel:
        assert len(tunnel.call(list, range(500000))) == 500000
        records = tunnel.call(eval, "[{'id': None} for _ in range(200000)]")
        assert len(records) == 200000
        assert tunnel.call(eval, '{n: -n for n in range(-100000, 100000)}')[-1] == 1
        assert len(tunnel.call(eval, "[{} for _ in range(200000)]")) == 200000


def test_lone_surrogates_come_back_printable(capsys):
    with Local('surrogates') as tunnel:
        value = tunnel.call(lone_surrogates)
    assert value == {'name': 'evil\ufffd\ufffdname', 'ok': 'plain'}
    print(value['name'].encode('utf-8').decode('utf-8'))
    assert 'evil' in capsys.readouterr().out


def test_codec_refuses_collisions_but_keeps_honest_hash_twins():
    assert codec.decode(codec.encode({-1: 'a', -2: 'b'})) == {-1: 'a', -2: 'b'}
    twins = {k * ((1 << 61) - 1): None for k in range(1, 17)}  # 15 share hash 0: allowed
    assert codec.decode(codec.encode(twins)) == twins
    with pytest.raises(codec.DecodeError, match='hash'):
        codec.decode(codec.encode(set(k * ((1 << 61) - 1) for k in range(1, 100))))

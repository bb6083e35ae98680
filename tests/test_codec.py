"""The safe codec: exact round trips, clear refusals, and no trust in the bytes."""
import collections
import datetime
import decimal
import enum
import pathlib
import uuid

import pytest

from chopsticks import codec

VALUES = [
    None, True, False, 0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 200, -(2 ** 200), 1.5, float('inf'),
    complex(1, -2), '', 'héllo wörld ☃', b'', b'\x00\xff' * 100,
    b'x' * (1 << 20), bytearray(b'mutable'), [1, [2, [3]]], (1, (2,), ()), {'a': 1, 2: 'b'},
    {(1, 2): frozenset({3}), None: [], b'k': {}}, {1, 'two', (3,)}, frozenset({4}), set(),
    datetime.datetime(2024, 5, 6, 7, 8, 9, 10),
    datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone(datetime.timedelta(hours=-3))),
    datetime.date(1999, 12, 31), datetime.time(23, 59, 59, 999999), datetime.timedelta(-2, 5, 7),
    decimal.Decimal('3.14159265358979323846264338327950288'), decimal.Decimal('-Infinity'),
    uuid.UUID('12345678-1234-5678-1234-567812345678'),
    pathlib.PurePosixPath('/etc/hosts'), pathlib.PureWindowsPath(r'C:\Windows'),
]


@pytest.mark.parametrize('value', VALUES, ids=lambda v: type(v).__name__)
def test_round_trip_keeps_value_and_type(value):
    decoded = codec.decode(codec.encode(value))
    assert decoded == value
    assert type(decoded) is type(value)


def test_nested_types_are_preserved():
    value = {'t': (1, b'2', [3.0, {4}])}
    decoded = codec.decode(codec.encode(value))
    assert type(decoded['t']) is tuple
    assert type(decoded['t'][1]) is bytes
    assert type(decoded['t'][2][1]) is set


def test_subclasses_travel_as_their_builtin_base():
    Point = collections.namedtuple('Point', 'x y')

    class Colour(enum.IntEnum):
        RED = 1

    decoded = codec.decode(codec.encode([Point(1, 2), collections.OrderedDict(a=1), Colour.RED]))
    assert decoded == [(1, 2), {'a': 1}, 1]
    assert [type(v) for v in decoded] == [tuple, dict, int]


def test_concrete_path_comes_back_pure():
    assert codec.decode(codec.encode(pathlib.Path('/tmp/x'))) == pathlib.PurePosixPath('/tmp/x')


def test_unsupported_type_names_the_type():
    class Custom:
        pass
    with pytest.raises(codec.EncodeError, match='Custom'):
        codec.encode([1, Custom()])


def test_large_bytes_are_not_copied_into_the_encoding():
    blob = b'z' * (4 << 20)
    parts = codec.encode_parts([blob])
    assert any(part is blob for part in parts)


@pytest.mark.parametrize('data, message', [
    (b'', 'truncated'),
    (b'Q', 'unknown type tag'),
    (b's\xff\xff\xff\xff', 'exceeds'),
    (b'l\xff\xff\xff\x7f', 'exceeds'),
    (b'NN', 'trailing'),
    (b's\x02\x00\x00\x00\xff\xfe', 'UTF-8'),
    (b'S\x01\x00\x00\x00l\x00\x00\x00\x00', 'unhashable'),
    (b'd\x01\x00\x00\x00l\x00\x00\x00\x00N', 'unhashable'),
    (b'D\x03\x00\x00\x00bad', 'invalid'),
    # the scalars' shortcut (small ints, short str) refuses what the general path does
    (b'i\x00\x00\x00\x00\x00\x00\x00', 'truncated'),
    (b'i\x00\x00\x00\x00\x00\x00\x00\x00\x00', 'trailing'),
    (b's\x03\x00\x00\x00ab', 'exceeds'),
    (b's\x01\x00\x00\x00ab', 'trailing'),
])
def test_malformed_input_is_a_decode_error(data, message):
    with pytest.raises(codec.DecodeError, match=message):
        codec.decode(data)


def test_deep_nesting_is_refused_not_a_crash():
    data = b'l\x01\x00\x00\x00' * 100000 + b'N'
    with pytest.raises(codec.DecodeError, match='nested'):
        codec.decode(data)


@pytest.mark.parametrize('value', [0, -1, 7, 2 ** 63 - 1, -2 ** 63, 2 ** 63, -2 ** 63 - 1, '', 'abc',
                                   'é' * 5000, 'x' * 16383, 'x' * 16384, True, 1.5])
def test_scalars_round_trip_with_their_type(value):
    # Small ints and short str take a shortcut on both sides: same bytes, same value.
    encoded = codec.encode(value)
    decoded = codec.decode(encoded)
    assert decoded == value and type(decoded) is type(value)
    assert codec.decode(memoryview(encoded)) == value


def test_lone_surrogates_in_a_short_str_come_back_replaced():
    assert codec.decode(codec.encode('a\ud800b')) == 'a\ufffdb'

"""The safe, typed codec for values coming back from a remote host.

Both sides use this module: the remote encodes return values with it and the
controller decodes them.  Decoding never executes code, never looks up a
class by name, and checks every length against the bytes actually present,
so a hijacked host can send garbage but cannot run code on the controller.
Decoding costs CPU linear in the frame's size (hash-colliding keys are
refused) and at most MEMORY_PER_BYTE bytes of objects per byte received.

It is shipped to the remote as source, so it is stdlib-only and must run on
Python 3.6.

Format: one tag byte per value, then a fixed-size body or a little-endian
uint32 length/count and that many bytes/items.  Exact builtin types keep
their type (a tuple stays a tuple, bytes stay bytes).  Subclasses of the
builtin containers and scalars (namedtuple, OrderedDict, IntEnum...) are
sent as their builtin base.  Everything else raises ``EncodeError`` naming
the type.
"""
import struct
import sys

__all__ = ['encode', 'decode', 'EncodeError', 'DecodeError']

MAX_DEPTH = 200        # nesting levels either side will build
BIG_BYTES = 64 * 1024  # bytes values this large travel as their own buffer

# Memory a decoded frame may cost: MEMORY_PER_BYTE bytes of objects per byte
# received, plus MEMORY_ALLOWANCE.  Each object is charged about what CPython
# 3.11 spends on it (sys.getsizeof, 8 more for the slot holding it; a dict
# or set at least its smallest table).  Measured charges per byte received:
# a list of small ints 4, of floats 3.6, of short str 8, a list of None 8,
# dicts of short str 10, a list of empty dicts 14, of one-key records
# ([{'id': None}, ...]) 20: honest data stays under 20.  The densest shapes
# an attacker can pick cost more: a list of empty sets 45 (a 57 MB reply of
# them took 2.8 GB), of {None: None} 27.  32 keeps a margin above every
# honest shape measured.  Fixed-size numbers are not charged (an int costs
# 28 bytes for its 9 on the wire, a float 24): a frame holds at most
# 32 + 28/9 times its size.
MEMORY_PER_BYTE = 32
MEMORY_ALLOWANCE = 1 << 20

# Keys of one dict or set whose hash values coincide make building it
# quadratic: 40,000 ints that are multiples of 2**61 - 1 (hash 0) took 8.5 s.
# More than COLLISIONS_ALLOWED keys of one container that share a hash value
# with another key refuse the frame.  Honest data has almost none: str and
# bytes hashes are salted per process, and among numbers hash(-1) == hash(-2)
# is the usual one.
COLLISIONS_ALLOWED = 16

_u32 = struct.Struct('<I')
_i64 = struct.Struct('<q')
_f64 = struct.Struct('<d')
_c128 = struct.Struct('<dd')
_delta = struct.Struct('<iii')  # days, seconds, microseconds

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1


class EncodeError(TypeError):
    """A value cannot travel in the codec (its type is named)."""


class DecodeError(ValueError):
    """Bytes that are not a valid encoding: the sender is broken or hostile."""


# --- encoding ---------------------------------------------------------------

class _Out(object):
    """Collects small pieces in a bytearray, large bytes as separate buffers."""

    __slots__ = ('parts', 'buf')

    def __init__(self):
        self.parts = []
        self.buf = bytearray()

    def big(self, data):
        if self.buf:
            self.parts.append(self.buf)
            self.buf = bytearray()
        self.parts.append(data)

    def finish(self):
        if self.buf:
            self.parts.append(self.buf)
        return self.parts


def _enc_none(v, out, depth):
    out.buf += b'N'


def _enc_bool(v, out, depth):
    out.buf += b'T' if v else b'F'


def _enc_int(v, out, depth):
    if _I64_MIN <= v <= _I64_MAX:
        out.buf += b'i'
        out.buf += _i64.pack(v)
    else:
        body = int(v).to_bytes((v.bit_length() + 8) // 8, 'little', signed=True)
        out.buf += b'I'
        out.buf += _u32.pack(len(body))
        out.buf += body


def _enc_float(v, out, depth):
    out.buf += b'f'
    out.buf += _f64.pack(v)


def _enc_complex(v, out, depth):
    out.buf += b'c'
    out.buf += _c128.pack(v.real, v.imag)


def _enc_blob(tag, data, out):
    out.buf += tag
    out.buf += _u32.pack(len(data))
    if len(data) >= BIG_BYTES:
        out.big(data)
    else:
        out.buf += data


def _enc_str(v, out, depth):
    _enc_blob(b's', str.encode(v, 'utf-8', 'surrogatepass'), out)


def _enc_bytes(v, out, depth):
    _enc_blob(b'b', v, out)


def _enc_bytearray(v, out, depth):
    _enc_blob(b'y', v, out)


def _enc_memoryview(v, out, depth):
    _enc_blob(b'b', v.cast('B') if v.ndim == 1 and v.format == 'B' else v.tobytes(), out)


def _enc_items(tag, items, out, depth):
    out.buf += tag
    out.buf += _u32.pack(len(items))
    for item in items:
        _encode(item, out, depth)


def _enc_list(v, out, depth):
    _enc_items(b'l', v, out, depth)


def _enc_tuple(v, out, depth):
    _enc_items(b't', v, out, depth)


def _enc_set(v, out, depth):
    _enc_items(b'S', v, out, depth)


def _enc_frozenset(v, out, depth):
    _enc_items(b'Z', v, out, depth)


def _enc_dict(v, out, depth):
    out.buf += b'd'
    out.buf += _u32.pack(len(v))
    for key, value in v.items():
        _encode(key, out, depth)
        _encode(value, out, depth)


def _enc_text(tag):
    def enc(v, out, depth):
        _enc_blob(tag, str(v).encode('utf-8'), out)
    return enc


def _enc_datetime(v, out, depth):
    _enc_blob(b'D', v.isoformat().encode('ascii'), out)


def _enc_timedelta(v, out, depth):
    out.buf += b'e'
    out.buf += _delta.pack(v.days, v.seconds, v.microseconds)


def _enc_uuid(v, out, depth):
    out.buf += b'U'
    out.buf += v.bytes


_ENCODERS = {
    type(None): _enc_none,
    bool: _enc_bool,
    int: _enc_int,
    float: _enc_float,
    complex: _enc_complex,
    str: _enc_str,
    bytes: _enc_bytes,
    bytearray: _enc_bytearray,
    memoryview: _enc_memoryview,
    list: _enc_list,
    tuple: _enc_tuple,
    set: _enc_set,
    frozenset: _enc_frozenset,
    dict: _enc_dict,
}

# Subclasses travel as their first supported base, in this order (bool
# before int: IntFlag members are ints, True is not a subclass instance).
_BASES = [bool, int, float, complex, str, bytes, bytearray, dict, list,
          tuple, frozenset, set]

# The stdlib value types, by the module that defines them.  They are not
# imported here (pathlib, decimal and uuid cost the agent tens of milliseconds
# at start): a value of one of these types can only exist once its module was
# imported, so they are looked up in sys.modules when an unknown type shows up.
_VALUE_TYPES = (
    ('datetime', 'datetime', _enc_datetime),  # before date: a datetime is a date
    ('datetime', 'date', _enc_text(b'a')),
    ('datetime', 'time', _enc_text(b'h')),
    ('datetime', 'timedelta', _enc_timedelta),
    ('decimal', 'Decimal', _enc_text(b'M')),
    ('uuid', 'UUID', _enc_uuid),
)
_value_types_seen = set()


def _learn_value_types():
    """Add the value types of newly imported modules to the encoders."""
    for module_name, type_name, enc in _VALUE_TYPES:
        module = sys.modules.get(module_name)
        cls = getattr(module, type_name, None)
        if cls is not None and cls not in _value_types_seen:
            _value_types_seen.add(cls)
            _ENCODERS[cls] = enc
            _BASES.append(cls)


def _encode(v, out, depth):
    enc = _ENCODERS.get(type(v))
    if enc is None:
        enc = _encoder_for_subclass(v)
    if depth >= MAX_DEPTH:
        raise EncodeError('value nested more than %d levels deep' % MAX_DEPTH)
    enc(v, out, depth + 1)


def _encoder_for_subclass(v):
    _learn_value_types()
    enc = _ENCODERS.get(type(v))
    if enc is not None:
        return enc
    pathlib = sys.modules.get('pathlib')
    if pathlib is not None and isinstance(v, pathlib.PurePath):
        tag = b'W' if isinstance(v, pathlib.PureWindowsPath) else b'P'
        return _enc_text(tag)
    for base in _BASES:
        if isinstance(v, base):
            return _ENCODERS[base]
    raise EncodeError('cannot send a value of type %s.%s back to the controller'
                      % (type(v).__module__, type(v).__qualname__))


def encode_parts(value):
    """Encode ``value`` as a list of buffers (large bytes are not copied)."""
    if value is None:
        return [b'N']  # the commonest result, without an encoder
    # The commonest scalars without an _Out and encoder calls: 1.4 to 0.4 µs
    # for an int on the host, in the round trip of every small call.
    kind = type(value)
    if kind is int and _I64_MIN <= value <= _I64_MAX:
        return [b'i' + _i64.pack(value)]
    if kind is str and len(value) < BIG_BYTES // 4:  # (4 bytes of UTF-8 at most per character)
        data = str.encode(value, 'utf-8', 'surrogatepass')
        return [b's' + _u32.pack(len(data)) + data]
    out = _Out()
    _encode(value, out, 0)
    return out.finish()


def encode(value):
    """Encode ``value`` to one bytes object."""
    return b''.join(encode_parts(value))


# --- decoding ---------------------------------------------------------------

class _Reader(object):
    __slots__ = ('data', 'pos', 'end', 'budget')

    def __init__(self, data):
        self.data = memoryview(data).cast('B')
        self.pos = 0
        self.end = len(data)
        self.budget = MEMORY_PER_BYTE * self.end + MEMORY_ALLOWANCE

    def charge(self, nbytes):
        """Count memory the value being decoded will take (see MEMORY_PER_BYTE)."""
        self.budget -= nbytes
        if self.budget < 0:
            raise DecodeError('the value would take more than %d bytes of memory per byte '
                              'received (refused at offset %d of %d)'
                              % (MEMORY_PER_BYTE, self.pos, self.end))

    def take(self, n):
        pos = self.pos
        if n > self.end - pos:
            raise DecodeError('truncated: wanted %d bytes at offset %d, have %d'
                              % (n, pos, self.end - pos))
        self.pos = pos + n
        return self.data[pos:pos + n]

    def unpack(self, st):
        pos = self.pos
        if st.size > self.end - pos:
            raise DecodeError('truncated at offset %d' % pos)
        self.pos = pos + st.size
        return st.unpack_from(self.data, pos)

    def length(self, min_item_size=1):
        n, = self.unpack(_u32)
        # Every item takes at least one byte: refuse counts the data cannot hold,
        # so a forged count cannot make us loop or allocate.
        if n * min_item_size > self.end - self.pos:
            raise DecodeError('length %d at offset %d exceeds the %d bytes left'
                              % (n, self.pos, self.end - self.pos))
        return n


def _dec_items(r, depth, header, per_item):
    n = r.length()
    r.budget -= header + per_item * n  # r.charge, inline
    if r.budget < 0:
        r.charge(0)
    return [_decode(r, depth) for _ in range(n)]


def _refuse_collisions(keys):
    """Refuse keys that would make building a dict or set quadratic."""
    if len(keys) <= COLLISIONS_ALLOWED:
        return
    try:
        # Distinct hash values are ints whose own hashes collide at most a few
        # at a time (an int hashes to itself modulo 2**61 - 1): linear.  str
        # hashes are cached and salted: counting them costs little and they
        # collide only by chance.
        shared = len(keys) - len(set(map(hash, keys)))
    except TypeError as e:
        raise DecodeError('unhashable dict key or set member: %s' % e)
    if shared > COLLISIONS_ALLOWED:
        raise DecodeError('%d of %d dict keys or set members share hash values with others '
                          '(a hash-collision attack: building it would take quadratic time)'
                          % (shared, len(keys)))


def _dec_surrogates(data):
    """Text that is not strict UTF-8: refused, unless its only fault is lone
    surrogates (Python can hold them, but print() and every strict encoder
    raise on them), which come back as U+FFFD."""
    try:
        text = str(data, 'utf-8', 'surrogatepass')
    except UnicodeDecodeError as e:
        raise DecodeError('invalid UTF-8 text: %s' % e)
    import re
    return re.sub('[\ud800-\udfff]', '\ufffd', text)


def _dec_text(r):
    try:
        return bytes(r.take(r.length())).decode('utf-8')
    except UnicodeDecodeError as e:
        raise DecodeError('invalid UTF-8 text: %s' % e)


def _decode(r, depth):
    if depth >= MAX_DEPTH:
        raise DecodeError('value nested more than %d levels deep' % MAX_DEPTH)
    depth += 1
    tag = bytes(r.take(1))
    if tag == b'N':
        return None
    if tag == b'T':
        return True
    if tag == b'F':
        return False
    if tag == b'i':
        return r.unpack(_i64)[0]
    if tag == b's':
        n = r.length()
        r.budget -= 49 + n  # r.charge, inline: the commonest value
        if r.budget < 0:
            r.charge(0)
        data = r.take(n)
        try:
            return str(data, 'utf-8')
        except UnicodeDecodeError:
            return _dec_surrogates(data)
    if tag == b'b':
        n = r.length()
        r.charge(33 + n)
        return bytes(r.take(n))
    if tag == b'l':
        n = r.length()
        r.budget -= 56 + 8 * n  # r.charge, inline
        if r.budget < 0:
            r.charge(0)
        return [_decode(r, depth) for _ in range(n)]
    if tag == b't':
        return tuple(_dec_items(r, depth, 40, 8))
    if tag == b'd':
        n = r.length(2)
        r.budget -= (106 + 42 * n) if n else 64  # r.charge, inline
        if r.budget < 0:
            r.charge(0)
        if n <= COLLISIONS_ALLOWED:
            result = {}
            for _ in range(n):
                key = _decode(r, depth)
                try:
                    result[key] = _decode(r, depth)
                except TypeError:
                    raise DecodeError('unhashable dict key of type %s' % type(key).__name__)
            return result
        keys, values = [], []
        for _ in range(n):
            keys.append(_decode(r, depth))
            values.append(_decode(r, depth))
        _refuse_collisions(keys)
        return dict(zip(keys, values))
    if tag == b'f':
        return r.unpack(_f64)[0]
    if tag == b'I':
        n = r.length()
        r.charge(28 + n)
        return int.from_bytes(r.take(n), 'little', signed=True)
    if tag == b'c':
        real, imag = r.unpack(_c128)
        return complex(real, imag)
    if tag == b'y':
        n = r.length()
        r.charge(57 + n)
        return bytearray(r.take(n))
    if tag in (b'S', b'Z'):
        items = _dec_items(r, depth, 216, 42)
        _refuse_collisions(items)
        try:
            return set(items) if tag == b'S' else frozenset(items)
        except TypeError:
            raise DecodeError('unhashable set member')
    return _decode_value_type(tag, r)


def _decode_value_type(tag, r):
    # Imported here, not at the top: the remote agent never decodes these.
    import datetime
    import decimal
    import pathlib
    import uuid
    try:
        if tag == b'D':
            return _parse_datetime(_dec_text(r))
        if tag == b'a':
            return datetime.date(*map(int, _dec_text(r).split('-')))
        if tag == b'h':
            return _parse_time(_dec_text(r))
        if tag == b'e':
            days, seconds, micros = r.unpack(_delta)
            return datetime.timedelta(days, seconds, micros)
        if tag == b'M':
            return decimal.Decimal(_dec_text(r))
        if tag == b'U':
            return uuid.UUID(bytes=bytes(r.take(16)))
        if tag == b'P':
            return pathlib.PurePosixPath(_dec_text(r))
        if tag == b'W':
            return pathlib.PureWindowsPath(_dec_text(r))
    except DecodeError:
        raise
    except (ValueError, TypeError, OverflowError, decimal.InvalidOperation) as e:
        raise DecodeError('invalid %r value: %s' % (tag, e))
    raise DecodeError('unknown type tag %r at offset %d' % (tag, r.pos - 1))


def _parse_datetime(text):
    import datetime
    if hasattr(datetime.datetime, 'fromisoformat'):
        return datetime.datetime.fromisoformat(text)
    raise DecodeError('datetime decoding needs Python 3.7+')  # remote 3.6 never decodes these


def _parse_time(text):
    import datetime
    if hasattr(datetime.time, 'fromisoformat'):
        return datetime.time.fromisoformat(text)
    raise DecodeError('time decoding needs Python 3.7+')


_ONE_BYTE_VALUES = {b'N': None, b'T': True, b'F': False}


def decode(data):
    """Decode one value that must fill ``data`` exactly."""
    size = len(data)
    if type(data) is bytes:  # the commonest results, without a reader
        if size == 1 and data in _ONE_BYTE_VALUES:
            return _ONE_BYTE_VALUES[data]
        if size == 9 and data[0] == 0x69:  # b'i'
            return _i64.unpack_from(data, 1)[0]
        if 5 <= size <= 4096 and data[0] == 0x73 and _u32.unpack_from(data, 1)[0] == size - 5:
            try:  # b's'
                return str(data[5:], 'utf-8')
            except UnicodeDecodeError:
                pass  # (the general way says what is wrong)
    r = _Reader(data)
    try:
        value = _decode(r, 0)
    except RecursionError:
        raise DecodeError('value nested too deeply')
    if r.pos != r.end:
        raise DecodeError('%d trailing bytes after the value' % (r.end - r.pos))
    return value

"""Pickling calls for the remote, including functions that have no import path.

Controller -> remote is the trusted direction, so calls travel as pickle.
Functions importable by name (``time.time``, ``mypkg.mod.fn``) pickle by
reference and the remote imports them, through the import hook if need be.
Functions that cannot be imported on the remote (defined in ``__main__``, a
REPL, a Jupyter cell, lambdas, closures) travel as *source* with the globals
and closure values they use, so it works whatever the remote's Python
version.  As a last resort (no source, as in the plain REPL) the code object
travels marshalled, which only works when both sides run the same version.
"""
import ast
import io
import linecache
import marshal
import pickle
import struct
import sys
import textwrap
import types

PROTOCOL = 4  # the highest protocol Python 3.6 reads

LAMBDA_NAME = '__chopsticks_lambda__'


class SourceUnavailable(Exception):
    pass


def importable(obj):
    """True if ``obj`` can be found on the remote by module and qualified name."""
    module = getattr(obj, '__module__', None)
    qualname = getattr(obj, '__qualname__', '')
    if module in (None, '__main__', '__mp_main__') or '<' in qualname:
        return False
    target = sys.modules.get(module)
    for part in qualname.split('.'):
        target = getattr(target, part, None)
    return target is obj


class CallPickler(pickle.Pickler):
    def __init__(self, file, remote_version=None):
        super().__init__(file, protocol=PROTOCOL)
        self.remote_version = remote_version
        self.in_progress = set()
        self.shipped = []  # functions and classes sent as source or code, to explain a failure
        # id -> (the object, its persistent id): an object met again (the
        # class of each of 1,000 instances) is sent as the same tuple, which
        # the pickle memoizes, and the host rebuilds it once (CallUnpickler).
        self.sent_as_source = {}

    def persistent_id(self, obj):
        kind = type(obj)
        if kind in _PLAIN_TYPES:
            return None
        if kind is types.FunctionType or isinstance(obj, type):
            if importable(obj):
                return None
            sent = self.sent_as_source.get(id(obj))
            if sent is None:
                sent = self.sent_as_source[id(obj)] = (obj, self._source_pid(obj))
            return sent[1]
        if kind is types.ModuleType:
            return ('mod', obj.__name__)
        if getattr(obj, '__module__', None) in _SCRIPT_MODULES and hasattr(obj, '__qualname__') \
                and kind is not types.MethodType and _pickled_by_name(obj):
            # Pickled by name, as a function is, but not a function or class
            # (an lru_cache wrapper): the host has no script to find it in.
            raise pickle.PicklingError(
                'cannot send %s (a %s.%s) to the remote: of what a script defines, functions and '
                'classes travel (as source); define it in a module, which the host imports'
                % (describe(obj), kind.__module__, kind.__qualname__))
        return None

    def _source_pid(self, obj):
        key = id(obj)
        self.in_progress.add(key)
        try:
            is_function = isinstance(obj, types.FunctionType)
            try:
                source, name, filename, lineno = source_of(obj)
            except SourceUnavailable as e:
                if is_function and self.remote_version and \
                        tuple(self.remote_version[:2]) == sys.version_info[:2]:
                    return self._code_pid(obj)
                if not is_function and _is_namedtuple_class(obj):
                    return ('namedtuple', obj.__name__, tuple(obj._fields),
                            tuple(obj.__new__.__defaults__ or ()))
                raise pickle.PicklingError(
                    'cannot send %s to the remote: %s' % (describe(obj), e))
            self.shipped.append(obj)
            if not is_function:
                return ('fn', source, name, filename, lineno,
                        self._class_globals(obj, source), {}, None, None)
            closure, self_cells = self._closure(obj)
            globals_, self_globals = self._globals_used(obj)
            # The source's defaults were replaced by None (source_of): their
            # values, computed here, travel instead (lambda i=i: ... in a loop).
            return ('fn', source, name, filename, lineno, globals_, closure,
                    obj.__defaults__, obj.__kwdefaults__, self_cells, self_globals)
        finally:
            self.in_progress.discard(key)

    def _code_pid(self, fn):
        self.shipped.append(fn)
        closure, self_cells = self._closure(fn)
        globals_, self_globals = self._globals_used(fn)
        return ('code', marshal.dumps(fn.__code__), fn.__name__, globals_,
                closure, fn.__defaults__, fn.__kwdefaults__, self_cells, self_globals)

    def _closure(self, fn):
        """The closure cells' values, and the names of cells holding ``fn`` itself.

        A nested function that calls itself (``def fact(n): ... fact(n - 1)``)
        has itself in a cell: the host binds that cell to the function it
        rebuilds rather than sending the function inside its own pickle."""
        values, self_names = {}, []
        for name, value in closure_values(fn).items():
            if value is fn:
                self_names.append(name)
            elif id(value) in self.in_progress:
                raise pickle.PicklingError(
                    'cannot send %s to the remote: its closure variable %r holds %s, which '
                    'refers back to it (mutually recursive nested functions); define them at '
                    'module level' % (describe(fn), name, describe(value)))
            else:
                values[name] = value
        return values, tuple(self_names)

    def _class_globals(self, cls, source):
        """The globals of its module a class's source names: bases,
        decorators and what its methods use (``json``, ``LIMIT``).  (Its own
        name needs none: the class statement binds it there.)"""
        namespace = getattr(sys.modules.get(cls.__module__), '__dict__', {})
        return self._globals_named(cls, namespace, names_in_source(source))[0]

    def _globals_used(self, fn):
        """The globals ``fn``'s code may load, and the names holding ``fn`` itself."""
        return self._globals_named(fn, fn.__globals__, names_used(fn.__code__))

    def _globals_named(self, obj, namespace, names):
        """The values ``names`` have in ``namespace``, the globals ``obj``
        (sent as source) uses, and the names holding ``obj`` itself."""
        used, self_names = {}, []
        for name in names:
            if name in namespace:
                value = namespace[name]
                if value is obj:
                    self_names.append(name)  # a global lambda calling itself by name
                    continue
                # A function being pickled further up (recursion) is defined
                # by its own source on the remote; don't send it twice.
                if id(value) in self.in_progress or value is namespace.get('__builtins__'):
                    continue
                used[name] = value
        return used, tuple(self_names)


# Values that cannot hide a function or class: the C pickler alone is right for them.
_PLAIN_TYPES = frozenset([type(None), bool, int, float, complex, str, bytes, bytearray])
_SCRIPT_MODULES = ('__main__', '__mp_main__')


def _pickled_by_name(obj):
    """Whether pickle would save ``obj`` as a reference by name, as its
    ``__reduce_ex__`` says with a string."""
    try:
        return isinstance(obj.__reduce_ex__(PROTOCOL), str)
    except Exception:
        return False


def _is_namedtuple_class(cls):
    """Made by ``collections.namedtuple`` (no class statement to send)."""
    return issubclass(cls, tuple) and isinstance(getattr(cls, '_fields', None), tuple) and \
        hasattr(cls, '_make')


# fn -> (the call fn() pickled by reference, the opcodes that push fn), or
# None when fn travels as source.
_by_reference = {}

# A protocol 4 pickle below this size is one frame: PROTO 4, FRAME <length>,
# its opcodes, STOP (the C pickler starts a new frame at 64 KiB).
_ONE_FRAME_MAX = 32 << 10
_PROTO4_FRAME = b'\x80\x04\x95'
_u64 = struct.Struct('<Q')
_u32 = struct.Struct('<I')
_BARE_TAIL = b')}\x94\x87\x94.'  # EMPTY_TUPLE EMPTY_DICT MEMOIZE TUPLE3 MEMOIZE STOP


def _pushing_fn(bare_call):
    """The opcodes of ``bare_call``, ``(fn, (), {})`` pickled, that push fn,
    without their MEMOIZEs; None if it was not pickled the usual way
    (module and name, then STACK_GLOBAL).  Read here rather than with
    pickletools, whose import cost a new process's first call 3 ms."""
    end = len(bare_call) - len(_BARE_TAIL)
    if not bare_call.startswith(_PROTO4_FRAME) or not bare_call.endswith(_BARE_TAIL) or \
            _u64.unpack_from(bare_call, 3)[0] != len(bare_call) - 11:
        return None
    pieces = []
    pos = 11
    while pos < end:
        op = bare_call[pos]
        if op == 0x94:  # MEMOIZE
            pos += 1
            continue
        if op == 0x8c:  # SHORT_BINUNICODE
            size = 2 + bare_call[pos + 1]
        elif op == 0x58:  # BINUNICODE
            size = 5 + _u32.unpack_from(bare_call, pos + 1)[0]
        elif op == 0x93:  # STACK_GLOBAL
            size = 1
        else:
            return None
        pieces.append(bare_call[pos:pos + size])
        pos += size
    return b''.join(pieces) if pos == end else None


def _spliced(push_fn, args, kwargs):
    """``(fn, args, kwargs)`` pickled, from the cached opcodes that push fn:
    the C pickler imports fn's module to check it at every call (1.8 of the
    2.3 µs that pickling ``(len, ('abc',), {})`` took).  ``(args, kwargs)``
    is pickled alone and its TUPLE2 replaced by a TUPLE3: fn's opcodes
    memoize nothing, so the memo indices of the rest are what they were.
    None for a pickle that is not one frame (large arguments)."""
    tail = pickle.dumps((args, kwargs), PROTOCOL)
    if len(tail) > _ONE_FRAME_MAX or tail[2] != 0x95 or tail[-3:] != b'\x86\x94.':
        return None  # (not FRAME first, or not TUPLE2 MEMOIZE STOP last)
    body = push_fn + tail[11:-3] + b'\x87.'  # TUPLE3 STOP
    return _PROTO4_FRAME + _u64.pack(len(body)) + body


def _plain(args, kwargs):
    for value in args:
        if type(value) not in _PLAIN_TYPES:
            return False
    for value in kwargs.values():
        if type(value) not in _PLAIN_TYPES:
            return False
    return True


def dumps_call(fn, args, kwargs, remote_version=None):
    """Pickle a call; functions without an import path travel as source."""
    if (not args and not kwargs) or _plain(args, kwargs):
        try:
            by_reference = _by_reference[fn]
        except (KeyError, TypeError):
            by_reference = None
            if importable(fn) and type(fn) is not type:
                bare_call = pickle.dumps((fn, (), {}), PROTOCOL)
                by_reference = (bare_call, _pushing_fn(bare_call))
            try:
                _by_reference[fn] = by_reference
            except TypeError:
                pass  # unhashable callable: just don't cache
        if by_reference is not None:
            bare_call, push_fn = by_reference
            if not args and not kwargs:
                return bare_call
            payload = None if push_fn is None else _spliced(push_fn, args, kwargs)
            return payload or pickle.dumps((fn, args, kwargs), PROTOCOL)
    buf = io.BytesIO()
    pickler = CallPickler(buf, remote_version)
    try:
        pickler.dump((fn, args, kwargs))
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        culprit = _what_cannot_travel(pickler.shipped, args, kwargs, remote_version)
        if culprit is None:
            raise
        try:  # the same type, so callers catching TypeError still do
            error = type(e)('%s cannot travel: %s' % (culprit, e))
        except Exception:
            raise e
        raise error from e
    return buf.getvalue()


def _travels(value, remote_version):
    try:
        CallPickler(io.BytesIO(), remote_version).dump(value)
    except Exception:
        return False
    return True


def _what_cannot_travel(shipped, args, kwargs, remote_version):
    """Name the first value of a failed call that cannot be pickled: an
    argument, or a default, closure variable or global of a function sent as
    source.  Runs only after a failure, so an honest call pays nothing."""
    def kind_of(value):
        return 'a %s.%s' % (type(value).__module__, type(value).__qualname__)
    for n, value in enumerate(args):
        if not _travels(value, remote_version):
            return 'argument %d (%s)' % (n + 1, kind_of(value))
    for name, value in kwargs.items():
        if not _travels(value, remote_version):
            return 'keyword argument %r (%s)' % (name, kind_of(value))
    for fn in shipped:
        code = fn.__code__
        positional = code.co_varnames[:code.co_argcount]
        captured = list(zip(positional[len(positional) - len(fn.__defaults__ or ()):],
                            fn.__defaults__ or (), ['default for parameter'] * code.co_argcount))
        captured += [(k, v, 'default for keyword-only parameter')
                     for k, v in (fn.__kwdefaults__ or {}).items()]
        captured += [(k, v, 'closure variable') for k, v in closure_values(fn).items()]
        namespace = fn.__globals__
        captured += [(k, namespace[k], 'global') for k in sorted(names_used(code))
                     if k in namespace and namespace[k] is not fn
                     and not isinstance(namespace[k], types.ModuleType)]
        for name, value, what in captured:
            if value is not fn and not _travels(value, remote_version):
                return 'the %s %r of %s (%s)' % (what, name, describe(fn), kind_of(value))
    return None


def describe(obj):
    return '%s.%s' % (getattr(obj, '__module__', '?'), getattr(obj, '__qualname__', repr(obj)))


def closure_values(fn):
    if not fn.__closure__:
        return {}
    values = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
        try:
            values[name] = cell.cell_contents
        except ValueError:  # an empty cell: not yet assigned
            pass
    return values


_names_cache = {}
_source_names_cache = {}


def names_in_source(source):
    """The names a piece of source loads (what a class sent as source may
    need from its module)."""
    names = _source_names_cache.get(source)
    if names is None:
        names = frozenset(node.id for node in ast.walk(ast.parse(source))
                          if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load))
        _source_names_cache[source] = names
    return names


def names_used(code):
    """Global names a code object (and the code nested in it) may load."""
    names = _names_cache.get(code)
    if names is None:
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= names_used(const)
        _names_cache[code] = names = frozenset(names)
    return names


# --- finding the source of a function, lambda or class -------------------------

_tree_cache = {}
_source_cache = {}


def _parse_file(filename):
    lines = linecache.getlines(filename)
    if not lines:
        raise SourceUnavailable('its source file %s cannot be read' % filename)
    text = ''.join(lines)
    key = (filename, hash(text))
    tree = _tree_cache.get(key)
    if tree is None:
        try:
            tree = ast.parse(text)
        except SyntaxError as e:
            raise SourceUnavailable('its source file %s does not parse: %s' % (filename, e))
        _tree_cache[key] = tree
    return text, tree


def source_of(obj):
    """(source, name to fetch after exec, filename, first line number)."""
    if isinstance(obj, types.FunctionType):
        key = obj.__code__
        filename = obj.__code__.co_filename
        firstlineno = obj.__code__.co_firstlineno
    else:
        key = obj
        module = sys.modules.get(obj.__module__)
        filename = getattr(module, '__file__', None) or '<unknown>'
        firstlineno = None
    cached = _source_cache.get(key)
    if cached is not None:
        return cached
    if filename.startswith('<') and not linecache.getlines(filename):
        raise SourceUnavailable('it was defined interactively and its source was not kept '
                                '(define it in a file, or use IPython/Jupyter)')
    text, tree = _parse_file(filename)
    if isinstance(obj, types.FunctionType) and obj.__name__ == '<lambda>':
        node = _find_lambda(tree, obj)
        segment = _signature_without_values(text, node)
        result = ('%s = (%s)\n' % (LAMBDA_NAME, segment), LAMBDA_NAME, filename, node.lineno)
    else:
        node = _find_definition(tree, obj, firstlineno)
        if isinstance(obj, types.FunctionType):
            segment = _signature_without_values(text, node)
            padding = _char_col(_lines(text)[node.lineno - 1], node.col_offset)
            segment = textwrap.dedent(' ' * padding + segment)
            first = node.lineno
        else:
            # From its first decorator (@dataclass), whole lines: the class is
            # at the top level of its file.
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            segment = textwrap.dedent(''.join(_lines(text)[first - 1:node.end_lineno]))
        result = (segment.rstrip('\n') + '\n', obj.__name__, filename, first)
    _source_cache[key] = result
    return result


def _lines(text):
    """Lines as ast numbers them: split at newlines only (str.splitlines
    also splits at form feeds, which some source files hold)."""
    return [line + '\n' for line in text.split('\n')]


def _char_col(line, byte_col):
    """ast columns count UTF-8 bytes; str offsets count characters."""
    return len(line.encode('utf-8')[:byte_col].decode('utf-8', 'replace'))


def _signature_without_values(text, node):
    """The source of a def or lambda with every expression Python evaluates
    when it defines the function (defaults, keyword-only defaults,
    annotations) replaced by ``(None)``.

    Those expressions ran on the controller; on the host the names they use
    may not exist (``lambda i=i: ...`` inside a loop, a default naming a
    local).  Their values travel beside the source instead (defaults) or not
    at all (annotations: the host's function has none).  Line breaks inside a
    replaced expression are kept so the host's line numbers stay right."""
    lines = _lines(text)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno, byte_col):
        return starts[lineno - 1] + _char_col(lines[lineno - 1], byte_col)

    args = node.args
    evaluated = list(args.defaults) + [d for d in args.kw_defaults if d is not None]
    if not isinstance(node, ast.Lambda):
        every_arg = (getattr(args, 'posonlyargs', []) + args.args + args.kwonlyargs
                     + [a for a in (args.vararg, args.kwarg) if a is not None])
        evaluated += [a.annotation for a in every_arg if a.annotation is not None]
        if node.returns is not None:
            evaluated.append(node.returns)
    begin, end = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
    pieces, at = [], begin
    for expr in sorted(evaluated, key=lambda e: (e.lineno, e.col_offset)):
        first, last = offset(expr.lineno, expr.col_offset), offset(expr.end_lineno, expr.end_col_offset)
        pieces.append(text[at:first])
        pieces.append('(None%s)' % ('\n' * text.count('\n', first, last)))
        at = last
    pieces.append(text[at:end])
    return ''.join(pieces)


def _find_lambda(tree, fn):
    code = fn.__code__
    candidates = [n for n in ast.walk(tree)
                  if isinstance(n, ast.Lambda) and n.lineno == code.co_firstlineno]
    if not candidates:
        raise SourceUnavailable('its source was not found at %s:%d'
                                % (code.co_filename, code.co_firstlineno))
    argnames = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]

    def same_arguments(node):
        args = node.args
        return tuple(a.arg for a in args.posonlyargs + args.args + args.kwonlyargs) == argnames
    candidates = [n for n in candidates if same_arguments(n)] or candidates
    if len(candidates) > 1:
        # Several lambdas on one line (one inside another, or side by side):
        # sending the wrong one would run the wrong code, so tell them apart.
        candidates = _lambdas_at(candidates, code)
    if len(candidates) != 1:
        raise SourceUnavailable('line %d of %s has several lambdas like it and chopsticks cannot '
                                'tell which one it is (define it with def)'
                                % (code.co_firstlineno, code.co_filename))
    return candidates[0]


def _lambdas_at(candidates, code):
    """The innermost candidates whose source span holds all of ``code``'s instructions."""
    positions = getattr(code, 'co_positions', None)  # Python 3.11+
    if positions is None:
        return candidates
    # Zero-width spans are not the lambda's text: Python 3.11+ places its
    # RESUME and implicit RETURN at column 0 of the first line, which no
    # lambda but one starting there holds, and every candidate was refused.
    spans = [(line, col, end_line, end_col) for line, end_line, col, end_col in positions()
             if None not in (line, end_line, col, end_col) and (line, col) != (end_line, end_col)]

    def holds(node):
        start, end = (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)
        return all(start <= (l, c) and (el, ec) <= end for l, c, el, ec in spans)
    holding = [n for n in candidates if holds(n)]
    # An enclosing lambda holds the inner one's text too: keep the innermost.
    return [n for n in holding if not any(o is not n and _inside_node(o, n) for o in holding)]


def _inside_node(inner, outer):
    return ((outer.lineno, outer.col_offset) <= (inner.lineno, inner.col_offset)
            and (inner.end_lineno, inner.end_col_offset) <= (outer.end_lineno, outer.end_col_offset))


def _find_definition(tree, obj, firstlineno):
    wanted = (ast.FunctionDef, ast.AsyncFunctionDef) if firstlineno else (ast.ClassDef,)
    qualparts = obj.__qualname__.split('.')
    for node in ast.walk(tree):
        if not isinstance(node, wanted) or node.name != obj.__name__:
            continue
        if firstlineno is None:
            if len(qualparts) == 1 and node in tree.body:
                return node
            continue
        starts = [node.lineno] + [d.lineno for d in node.decorator_list]
        if firstlineno in starts:
            return node
    if firstlineno is None:
        raise SourceUnavailable(
            'no class statement at the top level of %s defines it (made by a call, such as '
            'type() or namedtuple(), or inside a function): define it in a module, which the '
            'host imports' % getattr(sys.modules.get(obj.__module__), '__file__', obj.__module__))
    raise SourceUnavailable('its definition was not found in %s' % obj.__code__.co_filename)

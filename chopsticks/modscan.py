"""Which modules a module imports, read from its compiled code and its source.

The import server sends a module with everything it will import, so the
host asks once (chopsticks.modserver).  What a module imports at the top,
what only its functions import, names built from constants
(``import_module('x')``, ``__import__`` over a loop of constant names), and
which names of ``from pkg import name`` may be attributes rather than
modules: all read here, from the ``.pyc`` where there is one.
"""
import dis
import re

__all__ = ['static_imports', 'with_parents']

MODULE_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')


# What the import statements compile to: LOAD_CONST level (LOAD_SMALL_INT from
# 3.14), LOAD_CONST fromlist, IMPORT_NAME module.  Reading a module's .pyc
# for them took 1/20 of ast.parse's time over the real-packages bench set
# (640 modules, 9 MB of source: 0.6 s against 13 s on a loaded machine).
_IMPORT_NAME = dis.opmap['IMPORT_NAME']
_LOAD_CONST = dis.opmap['LOAD_CONST']
_LOAD_SMALL_INT = dis.opmap.get('LOAD_SMALL_INT')
_EXTENDED_ARG = dis.EXTENDED_ARG
_CACHE = dis.opmap.get('CACHE')  # inline cache units, from 3.11
_FIND_IMPORT_NAME = re.compile(b'(?=' + re.escape(bytes([_IMPORT_NAME])) + b')')
_CO_OPTIMIZED = 0x1  # a function's code (a class body's is not)
_CodeType = type(compile('', '', 'exec'))


def _instruction_before(code, end):
    """(offset, opcode, arg) of the instruction whose last unit precedes
    ``end`` (cache units skipped, EXTENDED_ARG prefixes folded in), or None."""
    pos = end - 2
    while _CACHE is not None and pos >= 0 and code[pos] == _CACHE:
        pos -= 2
    if pos < 0:
        return None
    arg, shift, start = code[pos + 1], 8, pos
    while start >= 2 and code[start - 2] == _EXTENDED_ARG:
        start -= 2
        arg |= code[start + 1] << shift
        shift += 8
    return start, code[pos], arg


def _code_imports(code):
    """(eager, lazy) lists of (level, module, fromlist) imported by a module's
    code object: its own code and its class bodies' are eager, what its
    functions (and lambdas, comprehensions) import is lazy."""
    eager, lazy = [], []
    stack = [(code, eager)]
    while stack:
        co, found = stack.pop()
        raw = co.co_code
        for match in _FIND_IMPORT_NAME.finditer(raw):
            pos = match.start()
            if pos % 2:
                continue
            name = _instruction_before(raw, pos + 2)
            if name is None or name[2] >= len(co.co_names):
                continue
            fromlist = _instruction_before(raw, name[0])
            level = _instruction_before(raw, fromlist[0]) if fromlist else None
            found.append((_constant_arg(co, level, 0), co.co_names[name[2]],
                          _constant_arg(co, fromlist, None)))
        for const in co.co_consts:
            if type(const) is _CodeType:
                stack.append((const, lazy if const.co_flags & _CO_OPTIMIZED else found))
    return eager, lazy


def _constant_arg(co, instruction, default):
    if instruction is None:
        return default
    _, op, arg = instruction
    if op == _LOAD_CONST and arg < len(co.co_consts):
        return co.co_consts[arg]
    if op == _LOAD_SMALL_INT:
        return arg
    return default


# __import__('x') and importlib.import_module('x'), and a loop over a tuple of
# names fed to them (requests: for package in ("urllib3", "idna"): __import__(package)).
_CONSTANT_IMPORT = re.compile(
    br"""^([ \t]*)[^#\n]*?\b(?:import_module|__import__)\(\s*(?:['"]([\w.]+)['"]\s*\)|(\w+)\s*\))""",
    re.M)
_NAME_LOOP = re.compile(br"""^([ \t]*)for\s+(\w+)\s+in\s+[(\[]([^)\]]*)[)\]]\s*:""", re.M)
_QUOTED = re.compile(br"""['"]([\w.]+)['"]""")


def _constant_imports(source):
    """(name, indented) of the modules ``source`` imports by a constant name
    passed to ``__import__`` or ``import_module``; ``indented``: in a block,
    perhaps a function's."""
    loops = {}
    for match in _NAME_LOOP.finditer(source):
        loops[match.group(2)] = (match.group(1), _QUOTED.findall(match.group(3)))
    for match in _CONSTANT_IMPORT.finditer(source):
        indent, constant, variable = match.groups()
        if constant:
            yield constant.decode('ascii'), bool(indent)
        elif variable in loops:
            loop_indent, names = loops[variable]
            for name in names:
                yield name.decode('ascii'), bool(loop_indent)


def static_imports(fullname, source, is_package, code):
    """Absolute names a module imports, read from its compiled ``code``: what
    its top-level code imports (in ``if``, ``try``, ``with`` and class bodies
    too), what only its functions do, and which of those may be attributes,
    not modules (``pkg.name`` of ``from pkg import name``)."""
    package = fullname if is_package else fullname.rpartition('.')[0]
    attributes = set()

    def absolute(level, module):
        if not isinstance(level, int) or not level:
            return module
        parts = package.split('.')
        if level - 1 >= len(parts):
            return None
        base = '.'.join(parts[:len(parts) - (level - 1)])
        return base + '.' + module if module else base

    def names(imports):
        found = []
        for level, module, fromlist in imports:
            base = absolute(level, module)
            if not base:
                continue
            found.append(base)
            for name in fromlist if isinstance(fromlist, tuple) else ():
                if isinstance(name, str) and name != '*':
                    found.append(base + '.' + name)
                    attributes.add(base + '.' + name)
        return found

    eager, lazy = _code_imports(code)
    eager, lazy = names(eager), names(lazy)
    if b'import_module(' in source or b'__import__(' in source:
        for name, indented in _constant_imports(source):
            if MODULE_NAME.match(name):
                (lazy if indented else eager).append(name)
    modules = set(with_parents(n for n in eager + lazy if n not in attributes))
    return with_parents(eager), with_parents(lazy), frozenset(attributes - modules)


def with_parents(found):
    """``found``'s names with every parent package before them, once each, in order."""
    names = []
    for name in found:
        parts = name.split('.')
        for i in range(1, len(parts) + 1):
            names.append('.'.join(parts[:i]))
    return tuple(dict.fromkeys(names))

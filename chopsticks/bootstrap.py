"""Starting the agent: the command line, the stub and the compressed payload.

The remote runs ``python -c STUB``.  The stub (valid Python 2 too, so a
Python 2 host gets a clear message instead of a SyntaxError) reads exactly
the compressed payload from stdin and executes it; the payload installs the
agent's three modules and starts it.  The agent then reads its settings as
the first frame.  The controller writes stub input, payload and settings in
one go, so starting costs no round trip beyond the remote process itself.

Without ``python=``, a POSIX shell loop finds the interpreter on the host in
the same round trip.
"""
import hashlib
import marshal
import os
import shlex
import sys
import zlib

from . import codec, wire

AGENT_MODULES = ('codec', 'wire', 'agent')  # installed as _chopsticks_<name>, in order

# The interpreters tried, in order, when the caller names none.
PYTHON_CANDIDATES = (
    ['python3'] + ['python3.%d' % minor for minor in range(14, 5, -1)]
    + ['python', '/usr/libexec/platform-python']
)

# Double quotes only: the stub travels inside single quotes through a shell.
# ``python -c`` puts the working directory first on sys.path: a linecache.py
# or a struct.py lying there would run inside the agent, as its user (root,
# for a Sudo tunnel started from a directory others can write to).  The stub
# takes it off before anything else is imported, as ``python -P`` would.
STUB = '''import sys
if sys.path[:1] == [""]: del sys.path[0]
if sys.version_info < (3, 6): sys.exit("chopsticks: %%s is Python %%s; chopsticks needs Python 3.6 or newer (pass python= to choose another interpreter)" %% (sys.executable, sys.version.split()[0]))
import os, zlib, marshal
n = %d
b = b""
while len(b) < n:
    c = os.read(0, n - len(b))
    if not c: sys.exit("chopsticks: the bootstrap was cut short")
    b += c
loader, modules = marshal.loads(zlib.decompress(b))
exec(loader)'''

# Run by the stub, with ``modules``: (name, source, code) for each agent module.
# The agent travels as source, plus compiled for the controller's own Python:
# a host running the same version skips compiling it (tens of milliseconds).
LOADER = '''same = sys.version_info[:2] == %r and sys.implementation.name == %r
for name, source, code in modules:
    module = type(sys)(name)
    module.__file__ = "<chopsticks %%s>" %% name
    sys.modules[name] = module
    code = marshal.loads(code) if code is not None and same else \\
        compile(source, module.__file__, "exec", dont_inherit=True)
    exec(code, module.__dict__)
del b, c, n, loader, modules, name, source, code, module, same
sys.modules["_chopsticks_agent"].main()
'''

# marshal's format for tuples, str and bytes, which every Python 3 reads.
MARSHAL_VERSION = 4

_payloads = {}  # type: dict


def payload(with_code=False):
    """The compressed agent, built once per controller process, and kept in
    the user's cache (chopsticks.cache) for the next: building it costs
    15-20 ms of compiling and compressing.

    A marshalled tuple rather than Python source with the modules in string
    literals: the remote reads it in microseconds instead of compiling
    300 kB of literals (3 ms).  ``with_code`` adds the agent compiled by this
    interpreter, which a host running the same Python version loads instead
    of compiling the source (tens of milliseconds saved, for a payload about
    twice as large: worth it on this machine, not over a slow link).
    """
    cached = _payloads.get(with_code)
    if cached is None:
        from . import cache
        here = os.path.dirname(os.path.abspath(__file__))
        sources = []
        for name in AGENT_MODULES:
            with open(os.path.join(here, name + '.py'), 'rb') as f:
                sources.append(f.read())
        loader = LOADER % (tuple(sys.version_info[:2]), sys.implementation.name)
        made_of = hashlib.sha256(repr((sys.version, sys.implementation.cache_tag, MARSHAL_VERSION,
                                       with_code, loader, AGENT_MODULES,
                                       [len(source) for source in sources])).encode())
        for source in sources:
            made_of.update(source)
        blob_name = 'agent-%s.z' % made_of.hexdigest()[:32]
        cached = cache.read_blob(blob_name)
        if cached is None:
            cached = _build_payload(loader, sources, with_code)
            cache.write_blob(blob_name, cached)
        # Two first connects may build it at once, and marshal's bytes for
        # code objects vary from one build to the next: keep the first, so the
        # stub's length and the payload sent agree for every connect.
        cached = _payloads.setdefault(with_code, cached)
    return cached


def _build_payload(loader, sources, with_code):
    modules = []
    for name, source in zip(AGENT_MODULES, sources):
        source = source.decode('utf-8')
        module = '_chopsticks_' + name
        code = None
        if with_code:
            code = marshal.dumps(compile(source, '<chopsticks %s>' % module, 'exec',
                                         dont_inherit=True))
        modules.append((module, source, code))
    # Level 6: 1% larger than level 9, and 6 ms to compress instead of 23.
    return zlib.compress(marshal.dumps((loader, tuple(modules)), MARSHAL_VERSION), 6)


def stub(with_code=False):
    return STUB % len(payload(with_code))


def python_argv(python, with_code=False):
    """argv that starts ``python`` with the stub."""
    return [python, '-c', stub(with_code)]


def discovery_script(with_code=False):
    """A POSIX shell command that runs the first interpreter it finds."""
    quoted = shlex.quote(stub(with_code))
    names = ' '.join(shlex.quote(p) for p in PYTHON_CANDIDATES)
    return (
        'for p in %s; do command -v "$p" >/dev/null 2>&1 && exec "$p" -c %s; done; '
        'echo "chopsticks: no python interpreter found on $(hostname 2>/dev/null || uname -n)'
        ' (tried %s; pass python= to name one)" >&2; exit 127'
        % (names, quoted, ' '.join(PYTHON_CANDIDATES))
    )


def remote_command(python, with_code=False):
    """The command line as one shell string (what ssh sends)."""
    if python:
        return ' '.join(shlex.quote(a) for a in python_argv(python, with_code))
    return discovery_script(with_code)


def stdin_preamble(settings, with_code=False):
    """What to write to the new process's stdin: the payload and the settings frame."""
    return payload(with_code) + wire.frame(0, wire.CONFIG, codec.encode(settings))

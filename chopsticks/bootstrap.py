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
import os
import shlex
import zlib

from . import codec, wire

AGENT_MODULES = ('codec', 'wire', 'agent')  # installed as _chopsticks_<name>, in order

# The interpreters tried, in order, when the caller names none.
PYTHON_CANDIDATES = (
    ['python3'] + ['python3.%d' % minor for minor in range(14, 5, -1)]
    + ['python', '/usr/libexec/platform-python']
)

# Double quotes only: the stub travels inside single quotes through a shell.
STUB = '''import sys
if sys.version_info < (3, 6): sys.exit("chopsticks: %%s is Python %%s; chopsticks needs Python 3.6 or newer (pass python= to choose another interpreter)" %% (sys.executable, sys.version.split()[0]))
import os, zlib
n = %d
b = b""
while len(b) < n:
    c = os.read(0, n - len(b))
    if not c: sys.exit("chopsticks: the bootstrap was cut short")
    b += c
exec(zlib.decompress(b))'''

LOADER = '''import sys
def _chopsticks_install(name, source):
    module = type(sys)(name)
    module.__file__ = "<chopsticks %%s>" %% name
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec", dont_inherit=True), module.__dict__)
    return module
%s
sys.modules["_chopsticks_agent"].main()
'''

_payload = None


def payload():
    """The compressed agent, built once per controller process."""
    global _payload
    if _payload is None:
        here = os.path.dirname(os.path.abspath(__file__))
        installs = []
        for name in AGENT_MODULES:
            with open(os.path.join(here, name + '.py')) as f:
                source = f.read()
            installs.append('_chopsticks_install(%r, %r)' % ('_chopsticks_' + name, source))
        _payload = zlib.compress((LOADER % '\n'.join(installs)).encode('utf-8'), 9)
    return _payload


def stub():
    return STUB % len(payload())


def python_argv(python):
    """argv that starts ``python`` with the stub."""
    return [python, '-c', stub()]


def discovery_script():
    """A POSIX shell command that runs the first interpreter it finds."""
    quoted = shlex.quote(stub())
    names = ' '.join(shlex.quote(p) for p in PYTHON_CANDIDATES)
    return (
        'for p in %s; do command -v "$p" >/dev/null 2>&1 && exec "$p" -c %s; done; '
        'echo "chopsticks: no python interpreter found on $(hostname 2>/dev/null || uname -n)'
        ' (tried %s; pass python= to name one)" >&2; exit 127'
        % (names, quoted, ' '.join(PYTHON_CANDIDATES))
    )


def remote_command(python):
    """The command line as one shell string (what ssh sends)."""
    if python:
        return ' '.join(shlex.quote(a) for a in python_argv(python))
    return discovery_script()


def stdin_preamble(settings):
    """What to write to the new process's stdin: the payload and the settings frame."""
    return payload() + wire.frame(0, wire.CONFIG, codec.encode(settings))

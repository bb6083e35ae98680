"""Everything the benchmark sets up before it measures anything.

A loopback sshd with one ssh_config alias per simulated host, a second
ssh_config that routes the same aliases through ``slowlink.py`` (the WAN
rows), the peers' virtual environment, a file of random bytes for the
transfer rows and a synthetic package tree for the remote-import row.
"""
import os
import random
import re
import shutil
import subprocess
import sys
import time
import venv

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
PEERS_DIR = os.path.join(BENCH_DIR, 'peers')
PEER_ENV = os.path.join(BENCH_DIR, '.env-peers')
# chopsticks 1.0 has the same distribution name as this project: hence its own venv.
# pyinfra and ansible-core: the whole-deployment rows (peer_pyinfra.py, peer_ansible.py).
PEER_REQUIREMENTS = ['chopsticks==1.0', 'mitogen', 'execnet', 'fabric', 'pyinfra==3.10.*',
                     'ansible-core==2.19.*']
TREE_PKG = 'chopsticks_bench_tree'
# The real-packages import row: released PyPI packages, pinned, pure Python
# (markupsafe's and PyYAML's C speedups are optional: a host without them runs
# their pure fallbacks), in a directory of their own that both the ours and the
# peers' interpreters put first on sys.path.  Without chardet or
# charset_normalizer, requests tries both and goes on without a detector.
REAL_PACKAGES_DIR = os.path.join(BENCH_DIR, '.env-imports')
REAL_PACKAGES_PURE = [
    'requests==2.34.2', 'urllib3==2.8.0', 'idna==3.20', 'certifi==2026.10.19.post1',
    'jinja2==3.1.6', 'click==8.5.0', 'attrs==26.1.0', 'packaging==26.3', 'pygments==2.21.0',
    'rich==15.0.0', 'python-dateutil==3.0.0', 'six==1.17.0', 'tomli==2.5.0']
REAL_PACKAGES_OPTIONAL_C = ['markupsafe==3.0.4', 'pyyaml==6.0.4']


def log(*args):
    print('[bench]', *args, file=sys.stderr, flush=True)


# -- ssh ------------------------------------------------------------------------

def byte_compile(package_dir):
    import compileall
    compileall.compile_dir(package_dir, quiet=1)


def start_sshd(aliases):
    from chopsticks.testing.sshd import LoopbackSSHD
    return LoopbackSSHD(aliases=aliases)


def find_slowlink():
    candidates = [
        os.environ.get('BENCH_SLOWLINK', ''),
        os.path.join(REPO, '..', 'shared', 'tools', 'slowlink.py'),
        '/work/shared/tools/slowlink.py',
    ]
    for path in candidates:
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    return None


def write_wan_config(ssh_config, slowlink, delay_ms, path):
    """A copy of ``ssh_config`` whose every Host block goes through slowlink.

    The delay applies to each direction, so the round trip costs twice it.
    The proxy runs under this interpreter's absolute path: a pyenv shim in
    front of ``python3`` would add ~130 ms to every connect.
    """
    proxy = '    ProxyCommand %s %s --delay-ms %g %%h %%p' % (sys.executable, slowlink, delay_ms)
    out = []
    with open(ssh_config) as f:
        for line in f.read().splitlines():
            out.append(line)
            if re.match(r'\s*Host\s', line):
                out.append(proxy)
    with open(path, 'w') as f:
        f.write('\n'.join(out) + '\n')
    return path


def ssh_version():
    out = subprocess.run(['ssh', '-V'], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip()


# -- interpreters ---------------------------------------------------------------

def python_version(python):
    try:
        out = subprocess.run([python, '-c', 'import sys; print(*sys.version_info[:3])'],
                             capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    if out.returncode:
        return None
    return tuple(int(x) for x in out.stdout.split())


def system_python():
    """The ``python3`` a login over ssh finds (sshd's default PATH, no pyenv shim)."""
    return shutil.which('python3', path='/usr/local/bin:/usr/bin:/bin') or sys.executable


def old_python():
    """An interpreter that still has ``imp``, for chopsticks 1.0's remote agent.

    1.0's agent imports ``imp``, removed in Python 3.12. Prefer the system
    python3; else a python3.11/3.10 on the path or under pyenv.
    """
    candidates = [system_python()]
    for minor in (11, 10, 9):
        candidates.append(shutil.which('python3.%d' % minor, path='/usr/local/bin:/usr/bin:/bin'))
    pyenv_root = os.path.expanduser('~/.pyenv/versions')
    if os.path.isdir(pyenv_root):
        for name in sorted(os.listdir(pyenv_root), reverse=True):
            candidates.append(os.path.join(pyenv_root, name, 'bin', 'python3'))
    for python in filter(None, candidates):
        version = python_version(python)
        if version and (3, 6) <= version < (3, 12):
            return python
    return None


def ensure_peer_env():
    """bench/.env-peers with the peers installed; created once, then reused.

    Returns (python, None) or (None, reason).
    """
    python = os.path.join(PEER_ENV, 'bin', 'python')
    stamp = os.path.join(PEER_ENV, '.bench-requirements')
    wanted = '\n'.join(PEER_REQUIREMENTS)
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read() == wanted and os.path.exists(python):
                return python, None
    log('creating %s with %s' % (PEER_ENV, ' '.join(PEER_REQUIREMENTS)))
    try:
        if not os.path.exists(python):
            venv.EnvBuilder(with_pip=True, clear=True).create(PEER_ENV)
        subprocess.run([python, '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
                        *PEER_REQUIREMENTS], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, 'could not build %s: %s' % (PEER_ENV, exc)
    with open(stamp, 'w') as f:
        f.write(wanted)
    return python, None


def ensure_real_packages():
    """bench/.env-imports with REAL_PACKAGES_* (pip --target); made once, then reused.

    Returns (directory, None) or (None, reason).
    """
    stamp = os.path.join(REAL_PACKAGES_DIR, '.bench-requirements')
    wanted = '\n'.join(REAL_PACKAGES_PURE + REAL_PACKAGES_OPTIONAL_C)
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read() == wanted:
                return REAL_PACKAGES_DIR, None
    log('installing %s into %s' % (' '.join(wanted.split()), REAL_PACKAGES_DIR))
    shutil.rmtree(REAL_PACKAGES_DIR, ignore_errors=True)
    pip = [sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
           '--no-deps', '--target', REAL_PACKAGES_DIR]
    # Only wheels tagged py3-none-any: chardet and tomli also ship mypyc-compiled ones.
    pure = ['--only-binary', ':all:', '--platform', 'any', '--implementation', 'py',
            '--abi', 'none', '--python-version', '3.8']
    try:
        subprocess.run(pip + pure + REAL_PACKAGES_PURE, check=True)
        subprocess.run(pip + REAL_PACKAGES_OPTIONAL_C, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, 'could not install the real packages: %s' % exc
    with open(stamp, 'w') as f:
        f.write(wanted)
    return REAL_PACKAGES_DIR, None


def bare_python(path):
    """A virtual environment of the system python3 without its site-packages
    (Debian's has PyYAML, Pygments and six): a host that lacks the real packages."""
    python = os.path.join(path, 'bin', 'python3')
    if not os.path.exists(python):
        subprocess.run([system_python(), '-m', 'venv', '--without-pip', path], check=True)
    return python


def peer_versions(python):
    code = ('import importlib.metadata as m\n'
            'for d in ("chopsticks", "mitogen", "execnet", "fabric", "paramiko", "pyinfra",\n'
            '          "ansible-core"):\n'
            '    print(d, m.version(d))')
    out = subprocess.run([python, '-c', code], capture_output=True, text=True, cwd='/')
    return dict(line.split() for line in out.stdout.splitlines())


# -- data -------------------------------------------------------------------------

def make_random_file(path, size):
    """Random bytes: ssh compression (mitogen's and execnet's default) gains nothing."""
    with open(path, 'wb') as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            left -= len(block)
    return path


MODULE_TEMPLATE = '''"""Synthetic module {name}: realistic size, imports its neighbours."""
import collections
import functools
{imports}

CONSTANTS = {constants!r}


class Record{index}(collections.namedtuple('Record{index}', 'key value weight')):
    """A small record type, as a real library would have."""

    def scaled(self, factor):
        return self._replace(weight=self.weight * factor)


@functools.lru_cache(maxsize=None)
def lookup(key):
    for k, v in CONSTANTS.items():
        if k == key:
            return v
    raise KeyError(key)


def summarise(records):
    total = 0
    for record in records:
        total += record.weight
    return {{'count': len(records), 'total': total, 'module': __name__}}


def helper_{index}(x):
    """Uses what it imported, so the imports are not dead code."""
    return [x, {uses}]
'''


def make_module_tree(root, packages=10, modules_per_package=19):
    """A package of ``1 + packages * (1 + modules_per_package)`` modules (201 by default).

    Within a subpackage each module imports the previous one; each imports a
    module of the previous subpackage too, so the graph is deep and acyclic.
    ``entry()`` on the top package returns how many of its modules are loaded.

    Imports are written ``from .mod import name``, never ``from . import mod``:
    mitogen 0.3's related-module scan turns the latter into ``pkg..mod`` and
    preloads nothing, which would cost it one round trip per module here.
    """
    rng = random.Random(5)
    top = os.path.join(root, TREE_PKG)
    shutil.rmtree(top, ignore_errors=True)
    os.makedirs(top)
    subs = ['sub%02d' % i for i in range(packages)]
    names = ['mod%02d' % m for m in range(modules_per_package)]
    for p, sub in enumerate(subs):
        os.makedirs(os.path.join(top, sub))
        for m, name in enumerate(names):
            imports, uses = [], []
            if m:
                imports.append('from .%s import helper_%d' % (names[m - 1], m - 1))
                uses.append('helper_%d' % (m - 1))
            if p:
                other = rng.randrange(modules_per_package)
                imports.append('from ..%s.%s import helper_%d as cross' % (subs[p - 1], names[other], other))
                uses.append('cross')
            constants = {'k%d' % i: rng.random() for i in range(12)}
            text = MODULE_TEMPLATE.format(
                name='%s.%s.%s' % (TREE_PKG, sub, name), index=m, imports='\n'.join(imports),
                constants=constants, uses=', '.join(uses) or 'None')
            with open(os.path.join(top, sub, name + '.py'), 'w') as f:
                f.write(text)
        with open(os.path.join(top, sub, '__init__.py'), 'w') as f:
            f.write('"""Subpackage %s."""\n' % sub)
            f.write(''.join('from .%s import helper_%d\n' % (name, m) for m, name in enumerate(names)))
    with open(os.path.join(top, '__init__.py'), 'w') as f:
        f.write('"""Synthetic package the remote hosts lack (bench/fixtures.py)."""\n')
        f.write(''.join('from .%s import helper_0 as %s_helper\n' % (sub, sub) for sub in subs))
        f.write('\n\ndef entry():\n'
                '    """Called remotely: importing this package imported the whole tree."""\n'
                '    import sys\n'
                '    return sum(1 for name in sys.modules if name.split(".")[0] == %r)\n'
                % TREE_PKG)
    return 1 + packages * (1 + modules_per_package)


def mem_available():
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_ticks():
    """(busy, total) jiffies of the whole machine, or None off Linux."""
    try:
        with open('/proc/stat') as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_for_quiet(busy_below=0.15, window=0.2, patience=20.0):
    """Wait until the machine's CPUs are mostly idle (at most ``patience`` s).

    What one run leaves behind (agents and sshd sessions of 48 hosts still
    exiting, a peer's lingering children) would otherwise land on the next
    run's samples: a Local connect measured right after the many-host rows
    took 30 ms instead of 22.  Returns the seconds waited.
    """
    start = time.monotonic()
    before = _cpu_ticks()
    while before is not None and time.monotonic() - start < patience:
        time.sleep(window)
        after = _cpu_ticks()
        if after is None:
            break
        total = after[1] - before[1]
        if total > 0 and (after[0] - before[0]) / total < busy_below:
            break
        before = after
    return time.monotonic() - start

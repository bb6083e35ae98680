"""Real-parts fixtures shared by the whole test suite.

Nothing here is mocked: ``sshd`` is a real OpenSSH server on 127.0.0.1,
``sudo_user`` is a real unprivileged account, and the interpreters come from
pyenv's real installations.

Fixtures
    ``sshd``         session-wide :class:`LoopbackSSHD` with aliases host1..host4;
                     sets ``CHOPSTICKS_SSH_CONFIG`` for the session.
    ``ssh_alias``    ``'host1'`` (the server is up once you have it).
    ``sudo_user``    name of a real unprivileged account (root only).
    ``pythons``      list of interpreter paths, see :func:`available_pythons`.
    ``remote_python`` a test taking this argument runs once per interpreter.

Helpers (``from conftest import available_pythons, python2``)
    :func:`available_pythons`, :func:`python2`.

A missing sshd skips the tests that need it, unless ``CHOPSTICKS_REQUIRE_SSHD``
is set (CI sets it) - then it is an error.
"""

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from typing import List, Optional

import pytest

from chopsticks.testing.sshd import LoopbackSSHD, SSHDNotFound

# chopsticks keeps what it learns between runs (chopsticks.cache); the tests
# start from an empty cache of their own, and remove it at the end.
TEST_CACHE = tempfile.mkdtemp(prefix='chopsticks-test-cache-')
os.environ['CHOPSTICKS_CACHE_DIR'] = TEST_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(TEST_CACHE, ignore_errors=True)

SSH_ALIASES = ('host1', 'host2', 'host3', 'host4')
SUDO_USER = 'chopsticks-test'
# Oldest and newest Python 3 the remote agent supports.
MIN_REMOTE_MINOR, MAX_REMOTE_MINOR = 6, 14


def pyenv_root() -> Optional[str]:
    """pyenv's root: ``$PYENV_ROOT``, else ``~/.pyenv``, else ``pyenv root``."""
    root = os.environ.get('PYENV_ROOT')
    if root and os.path.isdir(root):
        return root
    home_pyenv = os.path.expanduser('~/.pyenv')
    if os.path.isdir(home_pyenv):
        return home_pyenv
    if shutil.which('pyenv'):
        result = subprocess.run(['pyenv', 'root'], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        root = result.stdout.decode().strip()
        if result.returncode == 0 and os.path.isdir(root):
            return root
    return None


def _pyenv_interpreters(major: int) -> dict:
    """{minor: path} of versioned binaries (``pythonX.Y``, never a shim).

    When pyenv holds several patch releases of one minor version, the
    highest wins.
    """
    root = pyenv_root()
    if root is None:
        return {}
    found = {}
    pattern = re.compile(rf'python{major}\.(\d+)$')
    for version_dir in glob.glob(os.path.join(root, 'versions', '*')):
        patch = tuple(int(n) for n in re.findall(r'\d+', os.path.basename(version_dir)))
        for path in glob.glob(os.path.join(version_dir, 'bin', f'python{major}.*')):
            match = pattern.search(os.path.basename(path))
            if not match or not os.access(path, os.X_OK):
                continue
            minor = int(match.group(1))
            if minor not in found or patch > found[minor][0]:
                found[minor] = (patch, path)
    return {minor: path for minor, (_patch, path) in found.items()}


def available_pythons() -> List[str]:
    """Real Python 3.6-3.14 interpreters installed with pyenv, oldest first.

    Absent versions are simply left out; the list may be empty.
    """
    interpreters = _pyenv_interpreters(3)
    return [
        interpreters[minor]
        for minor in sorted(interpreters)
        if MIN_REMOTE_MINOR <= minor <= MAX_REMOTE_MINOR
    ]


def python2() -> Optional[str]:
    """A Python 2.7 interpreter (pyenv's, else ``python2.7`` on PATH), or None."""
    path = _pyenv_interpreters(2).get(7)
    if path:
        return path
    root = pyenv_root()
    path = shutil.which('python2.7')
    if path and not (root and path.startswith(os.path.join(root, 'shims'))):
        return path
    return None


def _python_id(path: str) -> str:
    return 'py' + re.search(r'python(\d+\.\d+)$', path).group(1)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if 'remote_python' in metafunc.fixturenames:
        paths = available_pythons()
        if paths:
            metafunc.parametrize('remote_python', paths, ids=[_python_id(p) for p in paths])
        else:
            metafunc.parametrize(
                'remote_python',
                [pytest.param(None, marks=pytest.mark.skip(reason='no pyenv Python 3.6-3.14 found'))],
            )


@pytest.fixture(scope='session')
def pythons() -> List[str]:
    """Every interpreter of :func:`available_pythons`; skips when there is none."""
    paths = available_pythons()
    if not paths:
        pytest.skip('no pyenv Python 3.6-3.14 found')
    return paths


@pytest.fixture(scope='session')
def sshd():
    """A real sshd on 127.0.0.1 with aliases host1..host4, for the whole session."""
    try:
        server = LoopbackSSHD(aliases=SSH_ALIASES)
    except SSHDNotFound as exc:
        if os.environ.get('CHOPSTICKS_REQUIRE_SSHD'):
            raise
        pytest.skip(f'{exc} (set CHOPSTICKS_REQUIRE_SSHD=1 to make this an error)')
    saved = os.environ.get('CHOPSTICKS_SSH_CONFIG')
    os.environ.update(server.env())
    try:
        yield server
    finally:
        if saved is None:
            os.environ.pop('CHOPSTICKS_SSH_CONFIG', None)
        else:
            os.environ['CHOPSTICKS_SSH_CONFIG'] = saved
        server.stop()


@pytest.fixture(scope='session')
def ssh_alias(sshd: LoopbackSSHD) -> str:
    """An ssh_config alias that reaches the loopback sshd."""
    return SSH_ALIASES[0]


@pytest.fixture(scope='session')
def sudo_user() -> str:
    """A real unprivileged account that root can ``sudo -u`` to.

    Created once with ``useradd -m`` when absent. Its password field is ``*``
    (no password login, but not *locked*) so the loopback sshd, which runs
    without PAM, accepts key logins for it too.
    """
    if os.geteuid() != 0:
        pytest.skip('sudo_user needs root to create and switch to a test account')
    if shutil.which('sudo') is None:
        pytest.skip('sudo not found: install sudo')
    try:
        pwd.getpwnam(SUDO_USER)
    except KeyError:
        subprocess.run(
            ['useradd', '--create-home', '--shell', '/bin/sh', '--password', '*', SUDO_USER],
            check=True,
        )
    return SUDO_USER

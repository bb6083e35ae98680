"""Sudo tunnels to a real unprivileged user; Docker when an engine runs."""
import os
import pwd
import shutil
import subprocess

import pytest

from chopsticks import ConnectError, Docker, Sudo
from remote_helpers import echo


def whoami():
    import getpass
    return getpass.getuser(), os.getuid()


def test_sudo_runs_as_the_user(sudo_user):
    with Sudo(sudo_user) as t:
        assert t.host == '%s@localhost' % sudo_user
        assert t.call(whoami) == (sudo_user, pwd.getpwnam(sudo_user).pw_uid)
        assert t.call(echo, (b'bytes', 1)) == (b'bytes', 1)  # remote_helpers served to it


def test_sudo_to_missing_user_is_a_connect_error(sudo_user):
    with pytest.raises(ConnectError) as info:
        Sudo('no-such-user-xyz').call(echo, 1)
    assert 'no-such-user-xyz' in str(info.value)


def _docker_running():
    if not shutil.which('docker'):
        return False
    return subprocess.run(['docker', 'info'], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


@pytest.mark.skipif(not _docker_running(), reason='no Docker engine runs on this machine')
def test_docker_tunnel():
    with Docker('chopsticks-test', image='python:3-slim') as t:
        assert t.call(echo, 'in a container') == 'in a container'


def test_docker_command_line():
    t = Docker('web', image='python:3.12', rm=True)
    argv = t.argv()
    assert argv[:6] == ['docker', 'run', '-i', '--name', 'web', '--rm']
    assert argv[6] == 'python:3.12'

"""The test infrastructure itself: a real sshd that verifies host keys."""

import os
import subprocess
import sys

import pytest

from chopsticks.testing.sshd import LoopbackSSHD, SSHDNotFound
from conftest import SSH_ALIASES, available_pythons, python2


def run(argv):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_every_alias_runs_a_command(sshd):
    for alias in SSH_ALIASES:
        result = run(['ssh', '-F', sshd.ssh_config, alias, 'echo', 'hi'])
        assert (result.returncode, result.stdout, result.stderr) == (0, 'hi\n', '')


def test_session_environment_points_at_the_server(sshd, ssh_alias):
    assert os.environ['CHOPSTICKS_SSH_CONFIG'] == sshd.ssh_config
    assert sshd.env() == {'CHOPSTICKS_SSH_CONFIG': sshd.ssh_config}
    assert sshd.ssh_argv(ssh_alias, 'true') == ['ssh', '-F', sshd.ssh_config, ssh_alias, 'true']


def write_client_config(directory, alias, server, known_host_key_pub):
    """An ssh_config that sends *alias* to *server* but trusts *known_host_key_pub*."""
    with open(known_host_key_pub) as f:
        key_type, key_blob = f.read().split()[:2]
    known_hosts = os.path.join(directory, 'known_hosts')
    with open(known_hosts, 'w') as f:
        f.write(f'[127.0.0.1]:{server.port} {key_type} {key_blob}\n')
    config = os.path.join(directory, 'ssh_config')
    with open(config, 'w') as f:
        f.write(
            f'Host {alias}\n'
            f'    HostName 127.0.0.1\n'
            f'    Port {server.port}\n'
            f'    User {server.user}\n'
            f'    IdentityFile {server.client_key}\n'
            f'    IdentitiesOnly yes\n'
            f'    UserKnownHostsFile {known_hosts}\n'
            f'    GlobalKnownHostsFile /dev/null\n'
            f'    StrictHostKeyChecking yes\n'
            f'    BatchMode yes\n'
        )
    return config


def test_a_different_host_key_is_refused(sshd, ssh_alias, tmp_path):
    with LoopbackSSHD(aliases=(ssh_alias,)) as impostor:
        # The impostor's address, but the first server's key in known_hosts:
        # ssh must refuse before running anything.
        mismatched = write_client_config(tmp_path, ssh_alias, impostor, sshd.host_key_pub)
        refused = run(['ssh', '-F', mismatched, ssh_alias, 'echo', 'hi'])
        assert refused.returncode == 255
        assert refused.stdout == ''
        assert 'Host key verification failed' in refused.stderr

        # The same client config with the impostor's own key succeeds, so it
        # was the host key, not the client key or the config, that refused.
        (tmp_path / 'ok').mkdir()
        matched = write_client_config(tmp_path / 'ok', ssh_alias, impostor, impostor.host_key_pub)
        assert run(['ssh', '-F', matched, ssh_alias, 'echo', 'hi']).stdout == 'hi\n'


def test_restart_keeps_port_and_keys():
    with LoopbackSSHD(aliases=('solo',)) as server:
        port, known_hosts = server.port, open(server.known_hosts).read()
        server.stop_daemon()
        assert not server.running
        assert run(server.ssh_argv('solo', 'true')).returncode == 255
        server.restart()
        assert (server.port, open(server.known_hosts).read()) == (port, known_hosts)
        assert run(server.ssh_argv('solo', 'echo', 'back')).stdout == 'back\n'
        directory = server.directory
    assert not os.path.exists(directory)


def test_logs_in_as_another_user(sudo_user):
    with LoopbackSSHD(aliases=('other',), user=sudo_user) as server:
        assert run(server.ssh_argv('other', 'id', '-un')).stdout == f'{sudo_user}\n'


def test_sudo_user_is_real_and_unprivileged(sudo_user):
    result = run(['sudo', '-n', '-u', sudo_user, 'id', '-u'])
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) != 0


def test_missing_sshd_is_reported_clearly():
    with pytest.raises(SSHDNotFound, match='sshd not found: install openssh-server'):
        LoopbackSSHD(sshd_path='/nonexistent/sshd')


def test_interpreters_are_real_binaries():
    for path in available_pythons() + [p for p in [python2()] if p]:
        assert '/shims/' not in path
        result = run([path, '-c', 'import sys; print(sys.version_info[0])'])
        assert result.returncode == 0, result.stderr


def test_the_loopback_sshd_needs_no_pytest():
    """The benchmark starts it from the README's virtual environment, which has no pytest."""
    code = "import sys; sys.modules['pytest'] = None; import chopsticks.testing.sshd"
    result = run([sys.executable, '-c', code])
    assert result.returncode == 0, result.stderr

"""SSH as a user's machine is set up, not as the test sshd writes it: host
keys only in the default ``~/.ssh/known_hosts`` (hashed, or as
``[host]:port``), and ssh_config settings scoped to one Host block."""
import os
import subprocess

import pytest

from chopsticks import ConnectError, Tunnel
from chopsticks.ssh import PREFERRED_CIPHERS, SSHSettings
from remote_helpers import echo


def config_without_known_hosts_lines(sshd, tmp_path):
    """The test sshd's ssh_config minus UserKnownHostsFile/GlobalKnownHostsFile:
    the common case, where ssh reads its default files."""
    text = '\n'.join(line for line in open(sshd.ssh_config).read().splitlines()
                     if 'KnownHostsFile' not in line) + '\n'
    config = tmp_path / 'ssh_config'
    config.write_text(text)
    return str(config)


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / 'home'
    (home / '.ssh').mkdir(parents=True, mode=0o700)
    monkeypatch.setenv('HOME', str(home))
    return home


def host_key_line(sshd, hostname):
    key_type, blob = open(sshd.host_key_pub).read().split()[:2]
    return '%s %s %s\n' % (hostname, key_type, blob)


@pytest.mark.parametrize('hashed', [False, True], ids=['plain', 'hashed'])
def test_paramiko_uses_the_default_known_hosts(sshd, tmp_path, home, hashed):
    known = home / '.ssh' / 'known_hosts'
    known.write_text(host_key_line(sshd, '[127.0.0.1]:%d' % sshd.port))
    if hashed:
        subprocess.run(['ssh-keygen', '-H', '-f', str(known)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert known.read_text().startswith('|1|')
    config = config_without_known_hosts_lines(sshd, tmp_path)
    tunnel = Tunnel('host1', ssh_config=config, transport='paramiko', connect_timeout=20)
    try:
        assert tunnel.call(echo, 'known') == 'known'
    finally:
        tunnel.close()


def test_paramiko_reads_known_hosts2(sshd, tmp_path, home):
    (home / '.ssh' / 'known_hosts2').write_text(
        host_key_line(sshd, '[127.0.0.1]:%d' % sshd.port))
    config = config_without_known_hosts_lines(sshd, tmp_path)
    with Tunnel('host1', ssh_config=config, transport='paramiko', connect_timeout=20) as tunnel:
        assert tunnel.call(echo, 2) == 2


def test_paramiko_still_refuses_an_unknown_key(sshd, tmp_path, home):
    other = tmp_path / 'other_key'
    subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(other)], check=True)
    key_type, blob = open(str(other) + '.pub').read().split()[:2]
    (home / '.ssh' / 'known_hosts').write_text(
        '[127.0.0.1]:%d %s %s\n' % (sshd.port, key_type, blob))
    config = config_without_known_hosts_lines(sshd, tmp_path)
    with pytest.raises(ConnectError) as info:
        Tunnel('host1', ssh_config=config, transport='paramiko', connect_timeout=20).call(echo, 1)
    assert '[host1]' in str(info.value)
    # And with nothing known at all.
    (home / '.ssh' / 'known_hosts').write_text('')
    with pytest.raises(ConnectError):
        Tunnel('host1', ssh_config=config, transport='paramiko', connect_timeout=20).call(echo, 1)


def test_ciphers_of_one_host_block_do_not_change_another_hosts_choice(sshd, tmp_path):
    """Only host1's block sets Ciphers: host1 keeps them, host2 still gets
    the AES-GCM preference, and both connect."""
    text = open(sshd.ssh_config).read().replace(
        'Host host1\n', 'Host host1\n    Ciphers aes256-ctr\n', 1)
    config = tmp_path / 'ssh_config'
    config.write_text(text)
    first = SSHSettings('host1', ssh_config=str(config)).openssh_argv()
    second = SSHSettings('host2', ssh_config=str(config)).openssh_argv()
    assert 'Ciphers=' + PREFERRED_CIPHERS not in first
    assert 'Ciphers=' + PREFERRED_CIPHERS in second
    for alias in ('host1', 'host2'):
        with Tunnel(alias, ssh_config=str(config), connect_timeout=20) as tunnel:
            assert tunnel.call(echo, alias) == alias

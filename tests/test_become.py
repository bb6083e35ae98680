"""Become: sudo with a password (a real user, a real sudoers rule that asks
for it, sudo over the loopback sshd), su://, doas://, and the CLI's
--become / -K."""
import json
import os
import pwd
import shutil
import subprocess
import textwrap

import pytest
from click.testing import CliRunner

from chopsticks import ConnectError, Doas, Local, Su, Sudo, Tunnel, inventory, plugins
from chopsticks.cli import main

PASSWORD_USER = 'chopsticks-pw'
PASSWORD = 'c0rrect h0rse; $(battery)'  # a space, a quote-worthy char, shell syntax: all literal
# One file per test run: two suites on one machine (worktrees) share /etc.
SUDOERS = '/etc/sudoers.d/chopsticks-pw-test-%d' % os.getpid()


@pytest.fixture(scope='session')
def password_user(sudo_user):
    """A user with a password, whom sudo asks for it (a rule without NOPASSWD),
    except to become ``sudo_user`` (NOPASSWD).  Removed at the end."""
    try:
        pwd.getpwnam(PASSWORD_USER)
        created = False
    except KeyError:
        subprocess.run(['useradd', '--create-home', '--shell', '/bin/sh', PASSWORD_USER], check=True)
        created = True
    # chpasswd reads "user:password" lines from stdin: never on a command line.
    subprocess.run(['chpasswd'], input='%s:%s\n' % (PASSWORD_USER, PASSWORD),
                   universal_newlines=True, check=True)
    with open(SUDOERS, 'w') as f:
        f.write('%s ALL=(%s) NOPASSWD: ALL\n' % (PASSWORD_USER, sudo_user))
        f.write('%s ALL=(ALL:ALL) ALL\n' % PASSWORD_USER)
    os.chmod(SUDOERS, 0o440)
    subprocess.run(['visudo', '-c', '-q', '-f', SUDOERS], check=True)
    try:
        yield PASSWORD_USER
    finally:
        try:
            os.unlink(SUDOERS)
        except FileNotFoundError:
            pass
        if created:
            subprocess.run(['userdel', '--remove', PASSWORD_USER], stderr=subprocess.DEVNULL)


@pytest.fixture
def login(sshd, ssh_alias, password_user):
    """A tunnel logged in (over the loopback sshd) as the password user."""
    tunnel = Tunnel(ssh_alias, user=password_user)
    yield tunnel
    tunnel.close()


def test_sudo_with_a_password_over_ssh(login):
    assert login.call(os.getuid) == pwd.getpwnam(PASSWORD_USER).pw_uid
    with Sudo('root', password=PASSWORD, via=login) as root:
        assert root.call(os.getuid) == 0
        assert root.run('id -un').stdout == 'root\n'
        assert root.host == 'root@%s' % login.host


def test_a_callable_password_is_asked_once(login):
    asked = []

    def ask():
        asked.append(1)
        return PASSWORD
    root = Sudo('root', password=ask, via=login)
    assert root.call(os.getuid) == 0
    root.close()
    assert root.call(os.getuid) == 0  # reconnects without asking again
    root.close()
    assert asked == [1]


def test_a_wrong_password_fails_at_once_saying_so(login):
    with pytest.raises(ConnectError) as info:
        Sudo('root', password='not ' + PASSWORD, via=login, connect_timeout=120).call(os.getuid)
    message = str(info.value)
    assert 'wrong password' in message and 'not ' + PASSWORD not in message
    assert PASSWORD not in message


def test_no_password_when_one_is_needed_says_so(login):
    with pytest.raises(ConnectError) as info:
        Sudo('root', via=login).call(os.getuid)
    assert 'needs a password' in str(info.value) and 'password=' in str(info.value)


def test_a_password_given_where_sudo_asks_none(login, sudo_user):
    # NOPASSWD to sudo_user: sudo never reads it, and the agent starts all the same.
    with Sudo(sudo_user, password=PASSWORD, via=login) as other:
        assert other.call(os.getuid) == pwd.getpwnam(sudo_user).pw_uid


def test_the_password_is_in_no_argv_environment_repr_or_cache(login):
    tunnel = Sudo('root', password=PASSWORD)
    transport = tunnel.transport()
    assert not any(PASSWORD in arg for arg in transport.argv)
    assert transport.env is None or PASSWORD not in repr(transport.env)
    assert PASSWORD not in repr(tunnel) and PASSWORD not in transport.what
    with Sudo('root', password=PASSWORD, via=login) as root:
        # The agent's command line on the host, as ps shows it.
        ps = root.run(['ps', '-eo', 'args']).stdout
        assert PASSWORD not in ps and 'sudo -S -k -p' in ps
        environ = root.run(['env']).stdout  # the agent's, which its commands inherit
        assert 'SUDO_USER=%s' % PASSWORD_USER in environ and PASSWORD not in environ
    cache = os.environ['CHOPSTICKS_CACHE_DIR']
    for folder, _, files in os.walk(cache):
        for name in files:
            with open(os.path.join(folder, name), 'rb') as f:
                assert PASSWORD.encode() not in f.read()


def test_su_as_root_and_su_scheme(sudo_user):
    uid = pwd.getpwnam(sudo_user).pw_uid
    tunnel = plugins.tunnel_from_url('su://%s' % sudo_user)
    assert isinstance(tunnel, Su)
    with tunnel:
        assert tunnel.call(os.getuid) == uid
    with Su(sudo_user, python='/usr/bin/python3') as tunnel:  # an argv after su's own options
        assert tunnel.run('id -un').stdout.strip() == sudo_user
    with pytest.raises(ValueError) as info:
        Su('root', password='x')
    assert 'terminal' in str(info.value)


def test_doas_scheme():
    tunnel = plugins.tunnel_from_url('doas://app')
    assert isinstance(tunnel, Doas) and tunnel.user == 'app'
    assert tunnel.argv()[:5] == ['doas', '-n', '-u', 'app', '--']
    if shutil.which('doas') is None:
        with pytest.raises(ConnectError) as info:
            tunnel.connect()
        assert 'doas' in str(info.value)


def test_cli_become_asks_once_for_every_host(login, sshd, ssh_alias, monkeypatch):
    asked = []

    def getpass(prompt):
        asked.append(prompt)
        return PASSWORD
    monkeypatch.setattr('chopsticks.cli_ops.getpass.getpass', getpass)
    host = '%s@%s' % (PASSWORD_USER, ssh_alias)
    other = '%s@%s' % (PASSWORD_USER, 'host2')
    result = CliRunner().invoke(main, ['exec', '--become', '-K', host, other, '--', 'id', '-un'])
    assert result.exit_code == 0, result.output
    assert result.output.count('    root') == 2 and len(asked) == 1
    assert '[%s] ok' % host in result.output

    result = CliRunner().invoke(main, ['exec', '--become=%s' % PASSWORD_USER, 'local', '--',
                                       'id', '-un'])
    assert result.exit_code == 0, result.output
    assert '    %s' % PASSWORD_USER in result.output

    result = CliRunner().invoke(main, ['exec', '--become', host, '--', 'true'])
    assert result.exit_code == 1 and 'needs a password' in result.output


def test_inventory_become_settings(tmp_path, sudo_user, sshd):
    path = tmp_path / 'inventory.ini'
    path.write_text(textwrap.dedent('''\
        [local]
        here ansible_connection=local
        there ansible_connection=local ansible_become=true ansible_become_user=%s
        badwolf.example.com:5309

        [remote]
        pw ansible_host=127.0.0.1 ansible_user=%s ansible_become=yes

        [remote:vars]
        ansible_port=%d
        ansible_ssh_private_key_file=%s
        ansible_ssh_common_args='-o UserKnownHostsFile=%s'
        ansible_become_password='%s'
        ''' % (sudo_user, PASSWORD_USER, sshd.port, sshd.client_key, sshd.known_hosts,
               PASSWORD)))
    inv = inventory.load(str(path))
    assert inv.tunnel('badwolf.example.com').ssh_settings.port == 5309
    assert isinstance(inv.tunnel('here'), Local)
    there = inv.tunnel('there')
    assert isinstance(there, Sudo) and there.user == sudo_user and there.host == 'there'
    group = inv.select('here:there')
    assert group.run('id -un')['there'].stdout.strip() == sudo_user
    group.close()
    pw = inv.tunnel('pw')
    assert isinstance(pw, Sudo) and pw.via.host == 'pw'
    assert pw.run('id -un').stdout == 'root\n'
    pw.close()
    pw.via.close()


def test_cli_become_leaves_a_host_that_becomes_someone_already(tmp_path, sudo_user):
    """--become wraps the hosts that become nobody yet; a host whose inventory
    says become_user keeps its own, as in Ansible (wrapped, it ran a second
    sudo as that user, which failed)."""
    path = tmp_path / 'inventory.ini'
    path.write_text(textwrap.dedent('''\
        here ansible_connection=local
        there ansible_connection=local ansible_become=true ansible_become_user=%s
        ''' % sudo_user))
    result = CliRunner().invoke(main, ['exec', '-i', str(path), '--become', 'here', 'there',
                                       '--', 'id', '-un'])
    assert result.exit_code == 0, result.output
    assert '    root' in result.output and '    %s' % sudo_user in result.output


def test_cli_facts_with_become(sudo_user):
    result = CliRunner().invoke(main, ['facts', '--become=%s' % sudo_user, 'local', '-f', 'hostname',
                                       '--json'])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)) == ['local']
    result = CliRunner().invoke(main, ['facts', '--become=no-such-user-xyz', 'local', '-f',
                                       'hostname'])
    assert result.exit_code == 1 and 'no-such-user-xyz' in result.output

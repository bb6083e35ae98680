"""Host strings (chopsticks.hosts): parsing, and ``via`` given as a host string.

``via`` must become a tunnel wherever a host string works: in
``tunnel_from_url``, in ``Group`` (host strings and its ``via=``), and on the
command line.  The live tests sudo to the real ``sudo_user`` account from a
Local relay and from the loopback sshd.
"""
import os
import pwd
import subprocess
import sys

import pytest
from click.testing import CliRunner

from chopsticks import cli
from chopsticks.group import ErrorResult, Group
from chopsticks.hookspecs import hookimpl
from chopsticks.hosts import parse_value, tunnel_from_url
from chopsticks.tunnel import Local, SSHTunnel, Sudo


def test_ssh_strings():
    assert tunnel_from_url('deploy@web1:2222').relay_spec() == (
        SSHTunnel, ('web1',), {'user': 'deploy', 'port': 2222})
    assert tunnel_from_url('ssh://[::1]:22').relay_spec() == (SSHTunnel, ('::1',), {'port': 22})
    assert tunnel_from_url('ssh://::1').relay_spec() == (SSHTunnel, ('::1',), {})
    assert tunnel_from_url('web1:22?port=22').relay_spec() == (SSHTunnel, ('web1',), {'port': 22})


def test_user_or_port_written_twice_must_agree():
    # As Tunnel('deploy@web1:2222', port=22) and fabric.Connection: not one silently winning.
    with pytest.raises(ValueError, match="port given twice for 'web1:2222'"):
        tunnel_from_url('ssh://web1:2222?port=22')
    with pytest.raises(ValueError, match="user given twice for 'deploy@web1'"):
        tunnel_from_url('deploy@web1?user=admin')
    result = CliRunner().invoke(cli.main, ['exec', 'web1:ssh', '--', 'true'])
    assert result.exit_code == 2 and "bad port 'ssh' in 'web1:ssh'" in result.output


def test_via_is_resolved_recursively():
    tunnel = tunnel_from_url('sudo://root?via=ssh://web1')
    assert isinstance(tunnel, Sudo) and isinstance(tunnel.via, SSHTunnel)
    assert tunnel.via.host == 'web1'
    nested = tunnel_from_url('sudo://app?via=sudo://root?via=local')
    assert (type(nested.via), type(nested.via.via)) == (Sudo, Local)
    assert nested.via.user == 'root'
    keyword = tunnel_from_url('sudo://app', via='web2')
    assert isinstance(keyword.via, SSHTunnel) and keyword.via.host == 'web2'


def test_a_bad_via_names_the_host():
    with pytest.raises(ValueError, match=r"bad via= in host 'sudo://root\?via=podman://x'.*"
                                         r"unknown tunnel scheme"):
        tunnel_from_url('sudo://root?via=podman://x')
    endless = 'local'
    for _ in range(20):
        endless = 'sudo://root?via=' + endless
    with pytest.raises(ValueError, match='nested through via= more than'):
        tunnel_from_url(endless)


def test_option_values_are_json_when_they_parse():
    assert parse_value('3600') == 3600
    assert parse_value('2.10-3') == '2.10-3'


@pytest.fixture
def uid_of(sudo_user):
    return pwd.getpwnam(sudo_user).pw_uid


def test_group_of_sudo_hosts_via_local_and_via_ssh(sudo_user, ssh_alias, uid_of):
    group = Group(['sudo://%s?via=local&name=via-local' % sudo_user,
                   'sudo://%s?via=%s&name=via-ssh' % (sudo_user, ssh_alias)])
    try:
        assert type(group.tunnels[1].via) is SSHTunnel
        assert group.call(os.geteuid) == {'via-local': uid_of, 'via-ssh': uid_of}
    finally:
        group.close()


def test_group_via_as_a_host_string(sudo_user, uid_of):
    group = Group(['sudo://%s' % sudo_user], via='local')
    try:
        assert isinstance(group.tunnels[0].via, Local)
        assert group.call(os.geteuid) == {'%s@localhost' % sudo_user: uid_of}
    finally:
        group.close()


class EuidFact(object):
    @hookimpl
    def chopsticks_register_facts(self, register):
        register(os.geteuid, name='euid')


@pytest.mark.parametrize('via', ['local', 'ssh_alias'])
def test_cli_facts_via(via, sudo_user, uid_of, request, chopsticks_plugin_manager):
    """The issue's command: ``chopsticks facts 'sudo://nobody?via=local'``
    failed with "'str' object has no attribute 'call'"."""
    if via == 'ssh_alias':
        via = request.getfixturevalue('ssh_alias')
    chopsticks_plugin_manager.register(EuidFact())
    host = 'sudo://%s?via=%s' % (sudo_user, via)
    result = CliRunner().invoke(cli.main, ['facts', host, '-f', 'euid'])
    assert (result.exit_code, result.output) == (0, '%s\n    euid  %d\n' % (host, uid_of))


def test_cli_host_strings_naming_one_host_are_a_usage_error(chopsticks_plugin_manager):
    chopsticks_plugin_manager.register(EuidFact())
    result = CliRunner().invoke(cli.main, ['facts', 'local', 'local://localhost', '-f', 'euid'])
    assert result.exit_code == 2
    assert "two different tunnels are named 'localhost'" in result.output


def imported_after(statement):
    code = ('import sys\n%s\nprint(" ".join(sorted(m for m in sys.modules if m == "pluggy" '
            'or m.startswith("chopsticks."))))' % statement)
    return set(subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                              text=True).stdout.split())


def test_layers_import_downwards_only():
    """A relay host (maybe Python 3.6, no pluggy) imports chopsticks.group;
    the plugin manager must not drag in tunnels, nor groups the manager."""
    group = imported_after('import chopsticks.group, chopsticks.queue')
    assert not group & {'pluggy', 'chopsticks.plugins', 'chopsticks.hosts', 'chopsticks.tunnel'}
    manager = imported_after('import chopsticks.plugins')
    assert not manager & {'chopsticks.hosts', 'chopsticks.tunnel', 'chopsticks.group'}
    hosts = imported_after('import chopsticks.hosts')
    assert 'chopsticks.group' not in hosts


def test_tunnel_constructed_with_a_via_string(sudo_user, uid_of):
    # Sudo(user, via='local') is the constructor spelling of 'sudo://user?via=local'.
    tunnel = Sudo(sudo_user, via='local')
    try:
        assert isinstance(tunnel.via, Local)
        assert tunnel.call(os.geteuid) == uid_of
    finally:
        tunnel.close()

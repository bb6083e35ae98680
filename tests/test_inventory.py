"""Inventories: Ansible INI and YAML as Ansible's documentation writes them,
chopsticks' TOML, patterns, variables, tunnels, and the CLI's ``-i``."""
import json
import textwrap

import pytest
from click.testing import CliRunner

from chopsticks import Group, SSHTunnel, inventory
from chopsticks.cli import main
from chopsticks.inventory import InventoryError

# The shapes of Ansible's "How to build your inventory" page, pointed at the
# loopback sshd (PORT, KEY, KNOWN_HOSTS are filled in).
ANSIBLE_INI = '''\
mail.example.com ansible_host=127.0.0.1

[webservers]
foo.example.com ansible_host=127.0.0.1
web[01:03] ansible_host=127.0.0.1 http_port=8080

[dbservers]
db-[a:c] ansible_host=127.0.0.1

[atlanta]
host1 ansible_host=127.0.0.1
host2 ansible_host=127.0.0.1 ntp_server=ntp.host2.example.com

[raleigh]
host3 ansible_host=127.0.0.1

[atlanta:vars]
ntp_server=ntp.atlanta.example.com
proxy=proxy.atlanta.example.com

[southeast:children]
atlanta
raleigh

[southeast:vars]
some_server=foo.southeast.example.com
halon_system_timeout=30
ntp_server=ntp.southeast.example.com

[prod:children]
webservers
dbservers

[all:vars]
ansible_port=PORT
ansible_ssh_private_key_file=KEY
ansible_ssh_common_args='-o UserKnownHostsFile=KNOWN_HOSTS -o StrictHostKeyChecking=yes'
ntp_server=ntp.example.com
'''

ANSIBLE_YAML = '''\
all:
  hosts:
    mail.example.com:
      ansible_host: 127.0.0.1
  vars:
    ansible_port: PORT
    ansible_ssh_private_key_file: KEY
    ansible_ssh_common_args: -o UserKnownHostsFile=KNOWN_HOSTS -o StrictHostKeyChecking=yes
    ntp_server: ntp.example.com
  children:
    webservers:
      hosts:
        foo.example.com:
          ansible_host: 127.0.0.1
        web[01:03]:
          ansible_host: 127.0.0.1
          http_port: 8080
    dbservers:
      hosts:
        db-[a:c]:
          ansible_host: 127.0.0.1
    southeast:
      vars:
        some_server: foo.southeast.example.com
        halon_system_timeout: 30
        ntp_server: ntp.southeast.example.com
      children:
        atlanta:
          hosts:
            host1:
              ansible_host: 127.0.0.1
            host2:
              ansible_host: 127.0.0.1
              ntp_server: ntp.host2.example.com
          vars:
            ntp_server: ntp.atlanta.example.com
            proxy: proxy.atlanta.example.com
        raleigh:
          hosts:
            host3:
              ansible_host: 127.0.0.1
    prod:
      children:
        webservers:
        dbservers:
'''

ALL_HOSTS = ['mail.example.com', 'foo.example.com', 'web01', 'web02', 'web03',
             'db-a', 'db-b', 'db-c', 'host1', 'host2', 'host3']


def _fill(text, sshd):
    return (text.replace('PORT', str(sshd.port)).replace('KEY', sshd.client_key)
            .replace('KNOWN_HOSTS', sshd.known_hosts))


@pytest.fixture(params=['ini', 'yaml'])
def ansible_inventory(request, sshd, tmp_path):
    text = ANSIBLE_INI if request.param == 'ini' else ANSIBLE_YAML
    path = tmp_path / ('hosts' if request.param == 'ini' else 'hosts.yml')
    path.write_text(_fill(text, sshd))
    return str(path)


def test_ansible_inventory_hosts_ranges_and_groups(ansible_inventory):
    inv = inventory.load(ansible_inventory)
    assert inv.hosts == ALL_HOSTS if ansible_inventory.endswith('hosts') else \
        sorted(inv.hosts) == sorted(ALL_HOSTS)
    assert inv.host_names('webservers') == ['foo.example.com', 'web01', 'web02', 'web03']
    assert inv.host_names('southeast') == ['host1', 'host2', 'host3']
    assert set(inv.host_names('prod')) == {'foo.example.com', 'web01', 'web02', 'web03',
                                           'db-a', 'db-b', 'db-c'}
    assert inv.host_names('ungrouped') == ['mail.example.com']


@pytest.mark.parametrize('pattern, expected', [
    ('webservers:dbservers', {'foo.example.com', 'web01', 'web02', 'web03', 'db-a', 'db-b', 'db-c'}),
    ('webservers,dbservers', {'foo.example.com', 'web01', 'web02', 'web03', 'db-a', 'db-b', 'db-c'}),
    ('prod:&webservers', {'foo.example.com', 'web01', 'web02', 'web03'}),
    ('webservers:!web02', {'foo.example.com', 'web01', 'web03'}),
    ('prod:&webservers:!foo.example.com:!web03', {'web01', 'web02'}),
    ('!webservers:&prod', {'db-a', 'db-b', 'db-c'}),  # order does not matter, as in Ansible
    ('web*', {'foo.example.com', 'web01', 'web02', 'web03'}),  # globs match groups and hosts
    ('db-?', {'db-a', 'db-b', 'db-c'}),
    ('~host[12]', {'host1', 'host2'}),
    ('all:!southeast:!prod', {'mail.example.com'}),
    ('*', set(ALL_HOSTS)),
    ('web[01:02]', {'web01', 'web02'}),
    ('host3', {'host3'}),
    ('webservers[0]', {'foo.example.com'}),  # subscripts, as Ansible: by position in the group
    ('webservers[-1]', {'web03'}),
    ('webservers[1:3]', {'web01', 'web02'}),
    ('webservers[2:]', {'web02', 'web03'}),
])
def test_patterns_as_ansible(ansible_inventory, pattern, expected):
    assert set(inventory.load(ansible_inventory).host_names(pattern)) == expected


def test_unknown_name_in_a_pattern_names_the_file(ansible_inventory):
    inv = inventory.load(ansible_inventory)
    with pytest.raises(InventoryError) as info:
        inv.select('webservers:&prodd')
    assert info.value.name == 'prodd' and ansible_inventory in str(info.value)
    assert 'prod' in str(info.value)  # the close match


def test_variables_merge_all_parent_child_host(ansible_inventory):
    inv = inventory.load(ansible_inventory)
    assert inv.vars('host1')['ntp_server'] == 'ntp.atlanta.example.com'  # child beats parent
    assert inv.vars('host2')['ntp_server'] == 'ntp.host2.example.com'    # host beats groups
    assert inv.vars('host3')['ntp_server'] == 'ntp.southeast.example.com'  # parent beats all
    assert inv.vars('web01')['ntp_server'] == 'ntp.example.com'
    assert inv.vars('host3')['some_server'] == 'foo.southeast.example.com'
    assert str(inv.vars('host1')['halon_system_timeout']) == '30'  # INI's :vars are strings
    assert inv.vars('web02')['http_port'] == 8080  # inline INI values are literals
    assert inv.vars('host1')['group_names'] == ['atlanta', 'southeast']
    assert inv.vars('host1')['inventory_hostname'] == 'host1'
    with pytest.raises(InventoryError):
        inv.vars('nohost')


def test_ansible_settings_make_ssh_tunnels(ansible_inventory, sshd):
    inv = inventory.load(ansible_inventory)
    tunnel = inv.tunnel('web02')
    assert isinstance(tunnel, SSHTunnel) and tunnel.host == 'web02'
    settings = tunnel.ssh_settings
    assert (settings.host, settings.port) == ('127.0.0.1', sshd.port)
    assert settings.options['IdentityFile'] == sshd.client_key
    assert settings.options['UserKnownHostsFile'] == sshd.known_hosts
    assert inv.tunnel('web02') is tunnel  # one per host


def test_select_runs_on_the_loopback_sshd(ansible_inventory):
    inv = inventory.load(ansible_inventory)
    group = inv.select('southeast:!host2')
    assert isinstance(group, Group) and group.hosts == ['host1', 'host3']
    try:
        results = group.run('echo $((40 + 2))')
    finally:
        group.close()
    assert {host: r.stdout for host, r in results.items()} == {'host1': '42\n', 'host3': '42\n'}



# Ansible reads host:port after a range, after dots following one, and
# around an IPv6 address in brackets; a bare IPv6 address has no port.
HOST_PORTS_INI = """\
[web]
web[1:2]:2222
db-[a:b].example.com:2200
plain:2222
pinned:2222 ansible_port=2300
[2001:db8::1]:2201
::1

[web:vars]
ansible_user=deploy
"""

HOST_PORTS_YAML = """\
all:
  hosts:
    web[1:2]:2222:
    db-[a:b].example.com:2200:
    plain:2222:
    pinned:2222:
      ansible_port: 2300
    '[2001:db8::1]:2201':
    '::1':
"""

HOST_PORTS = {'web1': 2222, 'web2': 2222, 'db-a.example.com': 2200, 'db-b.example.com': 2200,
              'plain': 2222, 'pinned': 2300, '2001:db8::1': 2201, '::1': None}


@pytest.mark.parametrize('text, format', [(HOST_PORTS_INI, 'ini'), (HOST_PORTS_YAML, 'yaml')])
def test_host_port_after_ranges_and_ipv6(text, format):
    inv = inventory.loads(text, format)
    assert {host: inv.settings(host).get('port') for host in inv.hosts} == HOST_PORTS
    assert inv.host_names('web1') == ['web1']
    settings = inv.tunnel('web2').ssh_settings
    assert (settings.host, settings.port) == ('web2', 2222)
    settings = inv.tunnel('2001:db8::1').ssh_settings
    assert (settings.host, settings.port) == ('2001:db8::1', 2201)


def test_a_bad_port_names_the_line(tmp_path):
    path = tmp_path / 'hosts'
    path.write_text('[web]\nweb1\nweb[2:3]:http\n')
    with pytest.raises(InventoryError, match=r"hosts:3: bad port 'http'") as info:
        inventory.load(str(path))
    assert info.value.name == 'web[2:3]:http'


def test_select_over_the_loopback_sshd_at_the_port_of_a_ranged_host(tmp_path, sshd):
    path = tmp_path / 'hosts'
    path.write_text(_fill(textwrap.dedent('''\
        [web]
        web[1:2]:PORT ansible_host=127.0.0.1

        [all:vars]
        ansible_ssh_private_key_file=KEY
        ansible_ssh_common_args='-o UserKnownHostsFile=KNOWN_HOSTS'
        '''), sshd))
    group = inventory.load(str(path)).select('web')
    try:
        results = group.run('echo up')
    finally:
        group.close()
    assert {host: r.stdout for host, r in results.items()} == {'web1': 'up\n', 'web2': 'up\n'}


TOML = '''\
[vars]
python = "python3"
ntp = "ntp.example.com"

[hosts.web1]
address = "127.0.0.1"
port = PORT
vars = { role = "frontend" }

[groups.web]
hosts = ["web1", "web[02:03]"]
identity_file = "KEY"
ssh_options = { UserKnownHostsFile = "KNOWN_HOSTS" }
vars = { http_port = 80, ntp = "ntp.web.example.com" }

[groups.web.hosts_vars_are_not_here]
'''


def test_toml_unknown_key_names_file_line_and_key(tmp_path, sshd):
    path = tmp_path / 'hosts.toml'
    path.write_text(_fill(TOML, sshd))
    with pytest.raises(InventoryError) as info:
        inventory.load(str(path))
    assert info.value.name == 'hosts_vars_are_not_here'
    assert '%s:16' % path in str(info.value) and 'unknown key' in str(info.value)


def test_toml_native_format(tmp_path, sshd):
    path = tmp_path / 'hosts.toml'
    text = _fill(TOML, sshd).replace('[groups.web.hosts_vars_are_not_here]\n', textwrap.dedent('''\
        [groups.prod]
        children = ["web"]
        vars = { env = "prod" }

        [hosts.web02]
        address = "127.0.0.1"
        port = PORT
        ''').replace('PORT', str(sshd.port)))
    path.write_text(text)
    inv = inventory.load(str(path))
    assert inv.hosts == ['web1', 'web02', 'web03']
    assert inv.host_names('prod:!web03') == ['web1', 'web02']
    variables = inv.vars('web1')
    assert (variables['role'], variables['http_port'], variables['ntp'], variables['env']) == \
        ('frontend', 80, 'ntp.web.example.com', 'prod')
    group = inv.select('web:!web03')
    try:
        results = group.run(['echo', 'ok'])
    finally:
        group.close()
    assert [r.stdout for r in results.values()] == ['ok\n', 'ok\n']
    assert inv.tunnel('web1').python == 'python3'


@pytest.mark.parametrize('name, text, line, culprit', [
    ('hosts', '[web]\nweb1\n[web:children]\ndb\n[db:children]\nweb\n', None, None),
    ('hosts', '[web\nweb1\n', 1, None),
    ('hosts', '[web:kids]\nweb1\n', 1, 'kids'),
    ('hosts', '[web]\nweb[05:01]\n', 2, 'web[05:01]'),
    ('hosts', '[web]\nweb1 port\n', 2, 'web1'),
    ('hosts.yml', 'all:\n  children:\n    web:\n      hostz:\n        web1:\n', 4, 'hostz'),
    ('hosts.yml', 'all:\n  hosts: [a, b\n', None, None),
    ('hosts.toml', '[hosts.web1]\nport = \n', 2, None),
    ('hosts.toml', '[groups.a]\nchildren = ["b"]\n[groups.b]\nchildren = ["a"]\n', None, None),
])
def test_bad_inventories_name_file_line_and_name(tmp_path, name, text, line, culprit):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InventoryError) as info:
        inventory.load(str(path))
    message = str(info.value)
    assert message.startswith(str(path))
    if line is not None:
        assert info.value.line == line and message.startswith('%s:%d:' % (path, line))
    if culprit is not None:
        assert info.value.name == culprit
    if 'children' in text and line is None:
        assert 'cycle' in message


def test_via_names_another_inventory_host(tmp_path, sshd):
    path = tmp_path / 'hosts'
    path.write_text(_fill(textwrap.dedent('''\
        bastion ansible_host=127.0.0.1
        inner ansible_host=127.0.0.1 via=bastion
        loop1 via=loop2
        loop2 via=loop1

        [all:vars]
        ansible_port=PORT
        ansible_ssh_private_key_file=KEY
        ansible_ssh_common_args='-o UserKnownHostsFile=KNOWN_HOSTS'
        '''), sshd))
    inv = inventory.load(str(path))
    inner = inv.tunnel('inner')
    assert inner.via is inv.tunnel('bastion')
    assert inner.run('echo through').stdout == 'through\n'
    inner.close()
    inv.tunnel('bastion').close()
    with pytest.raises(InventoryError) as info:
        inv.tunnel('loop1')
    assert 'cycle' in str(info.value)


def test_cli_list_hosts_and_exec_with_an_inventory(ansible_inventory, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(main, ['list-hosts', '-i', ansible_inventory, 'southeast:!host2'])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith('host1 ') and 'SSHTunnel' in lines[0] and lines[1].startswith('host3 ')
    assert lines[-1] == '2 hosts'

    monkeypatch.setenv('CHOPSTICKS_INVENTORY', ansible_inventory)
    result = runner.invoke(main, ['exec', 'atlanta', 'local', '--', 'echo', 'hello'])
    assert result.exit_code == 0, result.output
    assert '[host1] ok' in result.output and '[host2] ok' in result.output
    assert '[localhost] ok' in result.output and '3 ok, 0 failed' in result.output

    result = runner.invoke(main, ['exec', '--json', 'nosuchgroup', '--', 'true'])
    assert result.exit_code == 2 and 'nosuchgroup' in result.output

    result = runner.invoke(main, ['list-hosts', '--json', 'dbservers'])
    data = json.loads(result.output)
    assert sorted(data) == ['db-a', 'db-b', 'db-c'] and data['db-a']['vars']['ntp_server']


@pytest.mark.parametrize('command', [['exec'], ['facts', '-f', 'kernel']])
def test_cli_an_inventory_host_and_a_host_string_naming_it_are_a_usage_error(
        ansible_inventory, command):
    if command[0] == 'facts':
        pytest.importorskip('chopsticks_facts')
    args = command + ['-i', ansible_inventory, 'web01', 'ssh://web01']
    result = CliRunner().invoke(main, args + (['--', 'true'] if command == ['exec'] else []))
    assert result.exit_code == 2, result.output
    assert "two different tunnels are named 'web01'" in result.output
    assert '(hosts: web01 ssh://web01)' in result.output

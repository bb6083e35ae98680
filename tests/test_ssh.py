"""Tunnels over a real OpenSSH server on loopback, with both transports."""
import os
import re
import subprocess
import sys

import pytest

from chopsticks import ConnectError, RemoteException, Tunnel
from chopsticks import bootstrap
from remote_helpers import echo, fail

TRANSPORTS = ['openssh', 'paramiko']


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


def test_call_over_ssh(sshd, transport):
    with Tunnel('host1', transport=transport) as t:
        assert t.host == 'host1'
        assert t.call(echo, {'x': (1, b'2')}) == {'x': (1, b'2')}
        assert t.call(os.getpid) == t.remote_info['pid'] != os.getpid()
        with pytest.raises(RemoteException) as info:
            t.call(fail, 'over ssh')
        assert info.value.host == 'host1' and info.value.type_name == 'KeyError'
        assert t.call(echo, 1) == 1


def test_every_interpreter_over_ssh(sshd, remote_python):
    with Tunnel('host2', python=remote_python) as t:
        assert t.call(echo, [1, 'two', b'3']) == [1, 'two', b'3']
        assert os.path.realpath(t.remote_info['python']) == os.path.realpath(remote_python)


def test_user_and_port_override_the_config(sshd, transport):
    with Tunnel('host3', user=sshd.user, port=sshd.port, transport=transport) as t:
        assert t.call(echo, 'ok') == 'ok'



def test_user_at_host_colon_port_is_read_as_fabric_reads_it(sshd, transport):
    # Connection('u@h:2222') habits: the port is not part of the host name.
    with Tunnel('%s@host1:%d' % (sshd.user, sshd.port), transport=transport) as t:
        assert t.call(echo, 'ok') == 'ok'
        assert t.host == '%s@host1' % sshd.user
        assert (t.ssh_settings.host, t.ssh_settings.port) == ('host1', sshd.port)


def test_an_address_port_reaches_a_server_no_config_names(sshd):
    # Given both ways and agreeing is fine; disagreeing is an error, as in Fabric.
    address = '%s@127.0.0.1:%d' % (sshd.user, sshd.port)
    with Tunnel(address, port=sshd.port, IdentityFile=sshd.client_key,
                UserKnownHostsFile=sshd.known_hosts) as t:
        assert t.call(echo, 'ok') == 'ok'


def test_user_or_port_given_twice_must_agree():
    with pytest.raises(ValueError, match=r"port given twice for 'deploy@web1:2222': "
                                         r"2222 in the address and port=22"):
        Tunnel('deploy@web1:2222', port=22)
    with pytest.raises(ValueError, match=r"user given twice for 'deploy@web1'"):
        Tunnel('deploy@web1', user='admin')
    with pytest.raises(ValueError, match=r"bad port 'ssh' in 'web1:ssh'"):
        Tunnel('web1:ssh')


@pytest.mark.parametrize('address, host, port', [
    ('[::1]:2222', '::1', 2222), ('[::1]', '::1', None), ('::1', '::1', None),
    ('fe80::1%eth0', 'fe80::1%eth0', None), ('web1', 'web1', None),
])
def test_ipv6_addresses_take_a_port_in_brackets(address, host, port):
    settings = Tunnel(address).ssh_settings
    assert (settings.host, settings.port) == (host, port)


def test_fabric_connection_is_reused(sshd, transport):
    fabric = pytest.importorskip('fabric')
    conn = fabric.Connection('host1', config=fabric.Config(runtime_ssh_path=sshd.ssh_config))
    with Tunnel(conn, transport=transport) as t:
        assert t.call(echo, 'via fabric') == 'via fabric'


def test_reconnects_after_close(sshd, transport):
    t = Tunnel('host4', transport=transport)
    first = t.call(os.getpid)
    t.close()
    assert t.call(os.getpid) != first
    t.close()


def _connect_error(**kwargs):
    host = kwargs.pop('host', 'host1')
    with pytest.raises(ConnectError) as info:
        Tunnel(host, connect_timeout=20, **kwargs).call(echo, 1)
    return str(info.value)


def test_unknown_host_names_the_host(sshd, transport):
    message = _connect_error(host='no-such-host.invalid', transport=transport)
    assert 'no-such-host.invalid' in message
    assert 'resolve' in message.lower() or 'name' in message.lower()


def test_refused_key(sshd, transport):
    message = _connect_error(user='no-such-user', transport=transport)
    assert '[no-such-user@host1]' in message
    assert 'denied' in message.lower() or 'authentication' in message.lower()


def test_unknown_host_key_is_refused(sshd, tmp_path, transport):
    config = tmp_path / 'ssh_config'
    empty = tmp_path / 'known_hosts'
    empty.write_text('')
    text = open(sshd.ssh_config).read().replace(sshd.known_hosts, str(empty))
    config.write_text(text)
    message = _connect_error(ssh_config=str(config), transport=transport)
    assert '[host1]' in message
    assert 'host key' in message.lower() or 'known_hosts' in message.lower()


def test_missing_python_is_reported(sshd, transport):
    message = _connect_error(python='/nonexistent/python3', transport=transport)
    assert '/nonexistent/python3' in message


def test_python2_is_refused(sshd, transport):
    from conftest import python2
    if not python2():
        pytest.skip('no Python 2 interpreter')
    message = _connect_error(python=python2(), transport=transport)
    assert 'Python 2.7' in message and '3.6' in message


def test_interpreter_discovery_message_when_none_exists():
    out = subprocess.run(['/bin/sh', '-c', bootstrap.discovery_script()],
                         env={'PATH': '/nonexistent'}, capture_output=True, text=True)
    assert out.returncode == 127
    assert 'no python interpreter found' in out.stderr
    assert 'python3' in out.stderr and 'platform-python' in out.stderr


def test_a_script_that_never_closes_its_tunnel_still_exits(sshd, transport):
    # The tunnel is closed from its finalizer at interpreter exit, when no
    # new thread can start: closing must not wait for one.
    script = ('import os\nfrom chopsticks import Tunnel\n'
              't = Tunnel("host1", transport=%r)\nprint(t.call(os.getpid))\n' % transport)
    done = subprocess.run([sys.executable, '-c', script], env=dict(os.environ),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().isdigit()


def _negotiated_cipher(tunnel):
    """The cipher in ssh -v's account of the key exchange (kept from before the agent started)."""
    match = re.search(r'kex: client->server cipher: (\S+)', tunnel._conn.stderr_text())
    return match.group(1) if match else None


def test_openssh_prefers_aes_gcm_when_no_config_chooses_ciphers(sshd):
    with Tunnel('host1', LogLevel='DEBUG1') as t:
        assert t.call(echo, 1) == 1
        assert _negotiated_cipher(t) == 'aes128-gcm@openssh.com'


@pytest.mark.parametrize('where', ['ssh_config', 'included file', 'option'])
def test_ciphers_the_user_chose_are_kept(sshd, tmp_path, where):
    config = tmp_path / 'ssh_config'
    options = {'LogLevel': 'DEBUG1'}
    if where == 'ssh_config':
        config.write_text('Ciphers aes256-ctr\nInclude %s\n' % sshd.ssh_config)
    elif where == 'included file':
        (tmp_path / 'ciphers.conf').write_text('  ciphers=aes256-ctr\n')
        config.write_text('Include %s/*.conf\nInclude %s\n' % (tmp_path, sshd.ssh_config))
    else:
        config.write_text('Include %s\n' % sshd.ssh_config)
        options['Ciphers'] = 'aes256-ctr'
    with Tunnel('host1', ssh_config=str(config), **options) as t:
        assert t.call(echo, 1) == 1
        assert _negotiated_cipher(t) == 'aes256-ctr'


def test_a_host_running_our_python_gets_the_agent_compiled_next_time(sshd, transport):
    # It then skips compiling the agent (~16 ms of every connect).  The stub
    # on the agent's command line says how long a payload it was sent.
    def payload_length(tunnel):
        with open('/proc/%d/cmdline' % tunnel.remote_info['pid'], 'rb') as f:
            return int(re.search(rb'\nn = (\d+)\n', f.read()).group(1))

    # A spelling of our interpreter that no other test uses: to this process,
    # a host not seen yet.
    dots = ['.'] * (1 + TRANSPORTS.index(transport))
    python = os.path.join(os.path.dirname(sys.executable), *dots, os.path.basename(sys.executable))
    with Tunnel('host2', transport=transport, python=python) as first:
        assert payload_length(first) == len(bootstrap.payload(False))
    with Tunnel('host2', transport=transport, python=python) as again:
        assert again.call(echo, 'compiled') == 'compiled'
        assert payload_length(again) == len(bootstrap.payload(True))


def write_to_stderr_and_return(n):
    os.write(2, b'a line on stderr\n')
    return n


def test_a_host_writing_to_stderr_never_stalls_a_paramiko_tunnel(sshd, tmp_path):
    """paramiko wakes us for stdout and stderr through one pipe whose two
    halves are set and cleared without a common lock: reading stderr while
    the transport thread received a reply could leave the pipe clear with
    the reply waiting, and the tunnel then heard nothing more.  Eight
    tunnels with output on both streams hit it within a few rounds."""
    from chopsticks.group import Group
    names = ['noisy%d' % i for i in range(8)]
    with open(sshd.ssh_config) as f:
        text = f.read()
    config = tmp_path / 'ssh_config'
    config.write_text(text.replace('Host host1\n', 'Host host1 %s\n' % ' '.join(names), 1))
    tunnels = [Tunnel(name, transport='paramiko', ssh_config=str(config)) for name in names]
    group = Group(tunnels)
    try:
        for n in range(40):
            result = group.call(write_to_stderr_and_return, n, timeout=10)
            assert not dict(result.failures()), 'round %d' % n
            assert set(result.values()) == {n}
    finally:
        group.close()

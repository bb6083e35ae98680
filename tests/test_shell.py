"""Shell commands: ``tunnel.run``, ``group.run``, ``chopsticks exec``."""
import json
import os
import pwd
import signal
import subprocess
import threading
import time

import pytest
from click.testing import CliRunner

import chopsticks
from chopsticks import CommandFailed, CommandResult, CommandTimeout, Group, Local, Sudo, Tunnel
from chopsticks.cli import main
from chopsticks.errors import CallTimeout, ChopsticksError
from chopsticks.group import ErrorResult


@pytest.fixture(scope='module')
def local():
    with Local() as tunnel:
        yield tunnel


def test_string_runs_in_a_shell(local):
    result = local.run('echo $((6 * 7)); echo oops >&2')
    assert isinstance(result, CommandResult)
    assert (result.stdout, result.stderr, result.returncode, result.ok) == ('42\n', 'oops\n', 0, True)
    assert result.host == 'localhost' and result.command == 'echo $((6 * 7)); echo oops >&2'


def test_argv_list_involves_no_shell(local, tmp_path):
    odd = tmp_path / 'a file; rm -rf x $(y)'
    odd.write_text('content')
    result = local.run(['ls', '-l', str(odd)])
    assert str(odd) in result.stdout
    assert result.command.startswith('ls -l ') and "'" in result.command  # quoted for display


def test_failure_raises_with_host_command_status_and_stderr(local):
    with pytest.raises(CommandFailed) as info:
        local.run('echo first >&2; echo last words >&2; exit 3')
    error = info.value
    assert isinstance(error, ChopsticksError)
    assert (error.host, error.returncode) == ('localhost', 3)
    assert 'exit 3' in error.command
    assert 'last words' in error.stderr and 'last words' in str(error)
    assert '[localhost]' in str(error) and 'status 3' in str(error)
    assert error.result.stderr == 'first\nlast words\n'


def test_check_false_returns_the_failure(local):
    result = local.run('false', check=False)
    assert result.returncode == 1 and not result.ok and result.failed


def test_input_cwd_env(local, tmp_path):
    assert local.run('cat', input='hi').stdout == 'hi'
    assert local.run(['cat'], input=b'\x00\xff').stdout == '\x00\ufffd'  # undecodable: replaced
    assert local.run('pwd', cwd=str(tmp_path)).stdout.strip() == str(tmp_path)
    result = local.run('echo "$LANG $CHOPSTICKS_TEST_VAR $HOME"', env={'LANG': 'C', 'CHOPSTICKS_TEST_VAR': 7})
    assert result.stdout.split()[:2] == ['C', '7']
    assert result.stdout.split()[2] == os.environ['HOME']  # added to the environment, not replacing it


def test_large_input_and_output_both_ways(local):
    data = os.urandom(3 << 20)
    result = local.run('cat; head -c 200000 /dev/zero >&2', input=data, text=False)
    assert result.stdout == data and result.stderr == bytes(200000)


def test_text_false_gives_bytes(local):
    result = local.run(['printf', '\\377x'], text=False)
    assert result.stdout == b'\xffx'


def test_commands_can_trap_sighup_under_a_controller_started_with_nohup():
    """nohup makes the controller ignore SIGHUP; a Local agent inherits that.
    Its commands must not: a daemon they start (a sysvinit script's, say)
    could never trap SIGHUP, and a reload would go unheard."""
    import signal
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with Local() as host:
            result = host.run('trap "echo heard" HUP; kill -HUP $$; echo after')
    finally:
        signal.signal(signal.SIGHUP, before)
    assert result.stdout.split() == ['heard', 'after']


def test_missing_program_is_127(local):
    result = local.run(['/nonexistent/program'], check=False)
    assert result.returncode == 127 and 'nonexistent' in result.stderr
    assert local.run('nonexistent-command-xyz', check=False).returncode == 127


def _alive(marker):
    """Pids of processes whose command line holds ``marker``."""
    out = subprocess.run(['pgrep', '-f', marker], stdout=subprocess.PIPE, universal_newlines=True)
    return out.stdout.split()


def _wait_gone(marker, seconds=10.0):
    end = time.monotonic() + seconds
    while _alive(marker) and time.monotonic() < end:
        time.sleep(0.05)
    return _alive(marker)


def test_group_timeout_bounds_and_kills_the_command_unless_run_says_otherwise():
    """Group(timeout=N) is every operation's default timeout, run() included:
    one hung command must not hold up the fleet; run(timeout=...) still wins."""
    marker = 'sleep 3.%d' % os.getpid()
    group = Group([Local('a'), Local('b')], timeout=0.5)
    try:
        results = group.run(marker)
        assert all(isinstance(v, ErrorResult) and isinstance(v.exception, CommandTimeout)
                   for v in results.values()), results
        assert _wait_gone(marker) == []  # killed on the host, not left running
        unchecked = group.run(marker, check=False)
        assert all(v.timed_out and v.returncode == -9 for v in unchecked.values())
        assert all(v.ok for v in group.run('sleep 1', timeout=None).values())
        assert all(v.ok for v in group.run('sleep 1', timeout=30).values())
    finally:
        group.close()


def test_bad_cwd_names_the_directory_not_the_command(local, tmp_path):
    missing = str(tmp_path / 'missing')
    with pytest.raises(CommandFailed) as info:
        local.run('pwd', cwd=missing)
    text = str(info.value)
    assert text.startswith("[localhost] command 'pwd' ")
    assert "cannot change to directory %r: No such file or directory" % missing in text
    assert '/bin/sh' not in text and info.value.returncode == chopsticks.shell.CWD_FAILED
    a_file = tmp_path / 'file'
    a_file.write_text('')
    result = local.run(['ls'], cwd=a_file, check=False)
    assert result.returncode == chopsticks.shell.CWD_FAILED
    assert result.stderr == 'cannot change to directory %r: Not a directory\n' % str(a_file)
    # a missing program is still 127, and named
    result = local.run(['./no-such-program'], cwd=str(tmp_path), check=False)
    assert result.returncode == 127 and result.stderr.startswith('./no-such-program: ')


def test_cwd_tilde_is_the_home_directory_of_the_remote_user(sudo_user):
    home = pwd.getpwnam(sudo_user).pw_dir
    with Sudo(sudo_user) as tunnel:
        assert tunnel.run('pwd', cwd='~').stdout == home + '\n'
        assert tunnel.run('pwd', cwd='~/').stdout.rstrip('\n/') == home
        with pytest.raises(CommandFailed) as info:
            tunnel.run(['ls'], cwd='~/no-such-dir')
        assert "cannot change to directory '~/no-such-dir' (%s/no-such-dir): No such file" % home \
            in str(info.value)
        with pytest.raises(CommandFailed) as info:
            tunnel.run(['ls'], cwd='/root')  # root's, mode 700
        assert "cannot change to directory '/root': Permission denied" in str(info.value)
        assert 'ls: ' not in str(info.value)
    with Local() as tunnel:
        assert tunnel.run('pwd', cwd='~' + sudo_user).stdout == home + '\n'


def test_bad_cwd_over_ssh_names_the_directory(ssh_alias):
    with Tunnel(ssh_alias) as tunnel:
        with pytest.raises(CommandFailed) as info:
            tunnel.run('pwd', cwd='/nonexistent-dir')
        assert str(info.value).startswith("[%s] command 'pwd' " % tunnel.host)
        assert "cannot change to directory '/nonexistent-dir'" in str(info.value)


def _interrupt_once_running(marker):
    """Ctrl-C for the main thread as soon as ``marker`` runs (a timer thread
    of the test, as a user's Ctrl-C comes while run() waits)."""
    def interrupt():
        end = time.monotonic() + 20
        while not _alive(marker) and time.monotonic() < end:
            time.sleep(0.02)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


def _kill_leftovers(marker):
    for pid in _alive(marker):  # (only if the test failed: ours, by pid)
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize('where', ['local', 'ssh'])
def test_ctrl_c_kills_the_command_on_the_host_and_the_tunnel_goes_on(where, request):
    marker = 'sleep 60%d%d' % (os.getpid(), where == 'ssh')
    tunnel = Local() if where == 'local' else Tunnel(request.getfixturevalue('ssh_alias'))
    try:
        tunnel.call(len, '')  # connected: the interrupt comes while the command runs
        thread = _interrupt_once_running(marker)
        with pytest.raises(KeyboardInterrupt):
            tunnel.run(marker)
        thread.join()
        assert _wait_gone(marker) == []
        assert tunnel.connected and tunnel.run('echo still here').stdout == 'still here\n'
    finally:
        _kill_leftovers(marker)
        tunnel.close()


def test_ctrl_c_during_group_run_kills_the_command_on_every_host():
    marker = 'sleep 61%d' % os.getpid()
    group = Group([Local('a'), Local('b')])
    try:
        group.call(len, '')
        thread = _interrupt_once_running(marker)
        with pytest.raises(KeyboardInterrupt):
            group.run(marker)
        thread.join()
        assert _wait_gone(marker) == []
        assert all(v.ok for v in group.run('true').values())
    finally:
        _kill_leftovers(marker)
        group.close()


def test_timeout_kills_the_whole_process_group(local):
    marker = 'sleep 10%d' % os.getpid()  # a child of a child: the group must die
    with pytest.raises(CommandTimeout) as info:
        local.run('(%s; echo never) & echo started; wait' % marker, timeout=0.5)
    assert isinstance(info.value, CommandFailed) and isinstance(info.value, CallTimeout)
    assert info.value.result.timed_out and info.value.result.stdout == 'started\n'
    assert 'timed out' in str(info.value)
    assert _wait_gone(marker) == []
    result = local.run('sleep 30', timeout=0.2, check=False)
    assert result.timed_out and result.returncode == -9 and not result.ok


def test_closed_tunnel_kills_the_commands_children():
    marker = 'sleep 1%d' % (os.getpid() % 1000 + 1000)
    tunnel = Local()
    future = tunnel.call_async(chopsticks.shell.run_on_host, ['/bin/sh', '-c', marker + '; true'])
    end = time.monotonic() + 10
    while not _alive(marker) and time.monotonic() < end:
        time.sleep(0.02)
    assert _alive(marker)
    tunnel.close()
    with pytest.raises(ChopsticksError):
        future.result(10)
    assert _wait_gone(marker) == []


def test_a_killed_agent_takes_its_commands_with_it():
    marker = 'sleep 2%d' % (os.getpid() % 1000 + 1000)
    tunnel = Local()
    tunnel.call_async(chopsticks.shell.run_on_host, ['sleep', marker.split()[1]])
    end = time.monotonic() + 10
    while not _alive(marker) and time.monotonic() < end:
        time.sleep(0.02)
    os.kill(tunnel.remote_info['pid'], 9)
    assert _wait_gone(marker) == []
    tunnel.close()


def test_watchdog_ends_only_the_groups_still_registered():
    """The watchdog's bookkeeping: a group unregistered (its command ended; its
    id may be reused by anyone) is left alone, one that ignores SIGTERM gets
    SIGKILL, and ids that share digits (100012345 and 12345) are told apart."""
    def group(trap=''):
        return subprocess.Popen(['/bin/sh', '-c', trap + 'sleep 60 & wait'],
                                start_new_session=True)

    finished, stubborn, other = group(), group("trap '' TERM; "), group()
    watchdog = subprocess.Popen(['/bin/sh', '-c', chopsticks.shell.WATCHDOG],
                                stdin=subprocess.PIPE, start_new_session=True)
    try:
        lines = ['+%d' % finished.pid, '+%d' % stubborn.pid, '+%d' % other.pid,
                 # past pid_max (2**22): no group of that id can exist, were it killed
                 '+%d' % (10 ** 8 + stubborn.pid), '-%d' % (10 ** 8 + stubborn.pid),
                 '-%d' % finished.pid]
        watchdog.communicate(('\n'.join(lines) + '\n').encode(), timeout=10)
        assert stubborn.wait(10) == -9 and other.wait(10) == -15
        time.sleep(0.2)
        assert finished.poll() is None
    finally:
        for proc in (finished, stubborn, other):
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()


def test_stream_shows_lines_prefixed_with_the_host_and_returns_them(capfd):
    with Local('streamer') as tunnel:
        result = tunnel.run('for i in 1 2 3; do echo line$i; done; echo bad >&2', stream=True)
        assert result.stdout == 'line1\nline2\nline3\n' and result.stderr == 'bad\n'
        wanted = ['[streamer] %s' % line for line in ('line1', 'line2', 'line3', 'bad')]
        err = ''
        end = time.monotonic() + 10  # the controller shows remote output from a thread
        while not all(w in err for w in wanted) and time.monotonic() < end:
            time.sleep(0.02)
            err += capfd.readouterr().err
    for line in wanted:
        assert line in err


def test_result_prints_and_serialises(local):
    result = local.run('echo hello; exit 2', check=False)
    text = str(result)
    assert '[localhost] $ echo hello; exit 2' in text and 'exit 2' in text and 'hello' in text
    assert 'returncode=2' in repr(result)
    data = json.loads(result.to_json())
    assert data == {'host': 'localhost', 'command': 'echo hello; exit 2', 'returncode': 2,
                    'ok': False, 'timed_out': False, 'stdout': 'hello\n', 'stderr': ''}
    assert json.loads(local.run(['printf', '\\377'], text=False).to_json())['stdout'] == '\ufffd'


def test_over_ssh(ssh_alias):
    with Tunnel(ssh_alias) as tunnel:
        assert tunnel.run(['uname', '-s']).stdout == os.uname().sysname + '\n'
        with pytest.raises(CommandFailed) as info:
            tunnel.run('exit 4')
        assert info.value.host == tunnel.host


def test_group_run_holds_an_error_result_for_a_failing_host(ssh_alias):
    good = Local('good')
    group = Group([good, Tunnel(ssh_alias), Local('bad-python', python='/nonexistent/python')])
    try:
        results = group.run('echo hi from $(hostname)')
        assert isinstance(results[good.host], CommandResult) and results[good.host].stdout.startswith('hi')
        assert results[ssh_alias].ok
        assert isinstance(results['bad-python'], ErrorResult)
        failing = group.run('test $(id -u) = 12345')
        assert all(isinstance(v, ErrorResult) for v in failing.values())
        assert isinstance(failing['good'].exception, CommandFailed)
        unchecked = group.run('exit 5', check=False)
        assert unchecked['good'].returncode == 5
    finally:
        group.close()


def test_cli_exec_groups_output_and_fails_when_a_host_fails(sshd, ssh_alias):
    runner = CliRunner()
    result = runner.invoke(main, ['exec', 'local', ssh_alias, '--', 'echo', 'hi there'])
    assert result.exit_code == 0, result.output
    assert '[localhost]' in result.output and '[%s]' % ssh_alias in result.output
    assert result.output.count('hi there') == 2
    assert '2 ok' in result.output

    result = runner.invoke(main, ['exec', '--json', 'local', '--', 'echo out; echo err >&2; exit 3'])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data['localhost']['returncode'] == 3 and data['localhost']['stdout'] == 'out\n'
    assert data['localhost']['stderr'] == 'err\n' and data['localhost']['ok'] is False

    result = runner.invoke(main, ['exec', 'local', 'local://other', '--', 'test', '-d', '/'])
    assert result.exit_code == 0
    result = runner.invoke(main, ['exec', 'local', '--', 'exit 1'])
    assert result.exit_code == 1 and '1 failed' in result.output


def test_host_half_runs_on_every_python(remote_python):
    """The host side is stdlib-only and Python 3.6+; become.py compiles there too (relays)."""
    with Local(python=remote_python) as tunnel:
        result = tunnel.run('echo $0; exit 3', check=False, timeout=30)
        assert (result.stdout, result.returncode) == ('/bin/sh\n', 3)
        assert tunnel.run(['cat'], input='x', stream=True).stdout == 'x'
        for module in ('shell', 'become', 'errors', 'tunnel'):
            path = os.path.join(os.path.dirname(chopsticks.__file__), module + '.py')
            # raises RemoteException(SyntaxError) if it does not compile there
            tunnel.call(exec, 'compile(open(p).read(), p, "exec")', {'p': path})


def test_cli_exec_escapes_what_a_host_prints():
    """A host's \\r or escape sequence cannot forge a line from another host."""
    result = CliRunner().invoke(main, ['exec', 'local', '--',
                                       r"printf 'harmless\r[db1] FORGED\n\033]0;t\007x\n' >&2"])
    assert result.exit_code == 0, result.output
    assert '  ! harmless\\r[db1] FORGED\n' in result.output
    assert '  ! \\x1b]0;t\\x07x\n' in result.output
    assert '\r' not in result.output and '\x1b' not in result.output

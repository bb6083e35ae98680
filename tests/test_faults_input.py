"""Bad input: each a clear error at the call that caused it, naming the
host, and the tunnel keeps working.  (Basic cases live in test_calls.py,
test_ssh.py and test_files.py; these are the rest.)"""
import functools
import os
import socket
import sys
import threading

import pytest

from chopsticks import ConnectError, Local, RemoteException, Tunnel, TunnelClosed
from chopsticks.connection import Connection
from remote_helpers import echo, joined


@pytest.fixture(scope='module')
def local():
    tunnel = Local('badinput')
    yield tunnel
    tunnel.close()


def _generator():
    yield 1


UNPICKLABLE = {
    'lock': threading.Lock,
    'socket': socket.socket,
    'generator': _generator,
    'open file': lambda: open(os.devnull),
    'in a nested dict': lambda: {'a': [1, {'b': threading.Event()._cond}]},
    'inside a partial': lambda: functools.partial(echo, threading.Lock()),
}


@pytest.mark.parametrize('name', sorted(UNPICKLABLE))
def test_unpicklable_arguments(local, name):
    value = UNPICKLABLE[name]()
    try:
        with pytest.raises(TypeError) as info:
            local.call(echo, value)
        message = str(info.value)
        assert message.startswith('[badinput] cannot send the call to remote_helpers.echo')
        assert 'pickle' in message
    finally:
        if hasattr(value, 'close'):
            value.close()
    assert local.call(echo, 'still fine') == 'still fine'


def test_unpicklable_closure(local):
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r'^\[badinput\] cannot send the call'):
        local.call(lambda: lock.locked())
    assert local.call(echo, 1) == 1


# Lambdas, not module-level functions: those would travel by reference and
# make the remote import this module, and pytest with it.
UNSENDABLE_RETURNS = {
    'generator': (lambda: (i for i in range(3)), 'generator'),
    'open file': (lambda: open(os.devnull), 'TextIOWrapper'),
    'object in a dict': (lambda: {'a': [object()]}, 'builtins.object'),
    'self-referencing list': (lambda: (lambda v: v.append(v) or v)([]), 'nested more than'),
    'nested 500 deep': (lambda: __import__('functools').reduce(lambda v, _: [v], range(500), None),
                        'nested more than'),
    'exception instance': (lambda: ValueError('x'), 'ValueError'),
    'module': (lambda: os, 'module'),
}


@pytest.mark.parametrize('name', sorted(UNSENDABLE_RETURNS))
def test_unsendable_return_values(local, name):
    fn, named = UNSENDABLE_RETURNS[name]
    with pytest.raises(RemoteException) as info:
        local.call(fn)
    assert info.value.host == 'badinput'
    assert info.value.type_name == 'chopsticks.codec.EncodeError'
    assert named in info.value.msg
    assert local.call(echo, 'still fine') == 'still fine'


def test_two_lambdas_on_one_line_each_run_their_own_code(local):
    first, second = (lambda: 'first'), (lambda: 'second')
    assert (local.call(first), local.call(second)) == ('first', 'second')
    outer = lambda: local.call(lambda: 'inner')  # noqa: E731
    assert outer() == 'inner'


def test_lambdas_sharing_a_line_travel_as_source_to_another_python():
    """To a host whose Python differs from the controller's, lambdas travel
    as source, found by their line: two on one line, or one inside another,
    each run their own code.  (The ``local`` tunnel above runs this Python,
    where the code object travels instead and the source is never looked up.)"""
    from conftest import available_pythons
    others = [p for p in available_pythons() if not p.endswith('%d.%d' % sys.version_info[:2])]
    if not others:
        pytest.skip('no pyenv Python other than the controller\'s')
    with Local('otherpython', python=others[-1]) as t:
        calls = [t.call_async(lambda: 'first'), t.call_async(lambda: 'second')]
        assert [c.result(30) for c in calls] == ['first', 'second']
        assert t.call(lambda: sorted([3, 1, 2], key=lambda v: -v)) == [3, 2, 1]
        pairs = [lambda: 'a', (lambda n=2: lambda: n)()]
        assert [t.call(f) for f in pairs] == ['a', 2]


def test_huge_argument_and_return_value(local):
    size = 200 << 20
    big = b'x' * size
    assert local.call(len, big) == size
    del big
    assert len(local.call(bytes, 64 << 20)) == 64 << 20
    assert local.call(echo, 'after') == 'after'


def test_huge_argument_over_ssh(sshd):
    size = 64 << 20
    with Tunnel('host1') as t:
        assert t.call(len, os.urandom(size)) == size
        assert t.call(echo, 1) == 1


def test_call_too_big_for_a_frame_is_refused_before_sending():
    """Above the frame limit (1 GiB by default, 1 MiB here) a call is refused
    at once, not half-sent to an agent that would choke on it."""
    template = Local('small-frames')
    conn = Connection('small-frames', template.transport(),
                      dict(template.settings(), max_frame=1 << 20))
    conn.start(30)
    try:
        with pytest.raises(ValueError, match=r'^\[small-frames\] the call is \d+ bytes'):
            conn.call(conn.pickle_call(len, (b'x' * (2 << 20),), {}), len)
        assert conn.call(conn.pickle_call(len, (b'x' * 1000,), {}), len) == 1000
    finally:
        conn.close()


def test_not_a_function(local):
    with pytest.raises(RemoteException) as info:
        local.call(42)
    assert info.value.type_name == 'TypeError' and 'not callable' in info.value.msg
    with pytest.raises(RemoteException, match='TypeError'):
        local.call(echo, 1, 2, 3)
    assert local.call(echo, 1) == 1


@pytest.mark.parametrize('chunks, named', [(b'abcdef', 'not int (chunks is an iterable'),
                                           (['text'], 'not str')])
def test_call_stream_chunks_that_are_not_bytes(local, chunks, named):
    with pytest.raises(TypeError) as info:
        local.call_stream(joined, chunks)
    message = str(info.value)
    assert message.startswith('[badinput] call_stream(remote_helpers.joined)') and named in message
    assert local.call_stream(joined, [b'abc', b'def']) == (['bytes'], b'abcdef')


def test_call_that_exits_the_remote_python(local):
    with pytest.raises(RemoteException) as info:
        local.call(sys.exit, 3)
    assert info.value.type_name == 'SystemExit'
    pid = local.remote_info['pid']
    with pytest.raises(TunnelClosed, match=r'^\[badinput\]'):
        local.call(os._exit, 3)
    assert local.call(os.getpid) != pid  # reconnected


def test_call_that_closes_stdin_and_stdout(local):
    """The protocol does not travel on fds 0 and 1 once the agent runs, so a
    call closing them (as daemonising code does) breaks nothing."""
    def close_stdio():
        import os
        os.close(0)
        os.close(1)
        return 'closed'
    assert local.call(close_stdio) == 'closed'
    assert local.call(echo, 'after') == 'after'


def test_missing_interpreter_message_names_the_command_not_the_stub():
    with pytest.raises(ConnectError) as info:
        Local('nopython', python='/nonexistent/python3').call(echo, 1)
    message = str(info.value)
    assert message.startswith('[nopython] could not connect: cannot run /nonexistent/python3: ')
    assert 'zlib' not in message and len(message) < 200


def test_missing_interpreter_through_sudo(sudo_user):
    from chopsticks import Sudo
    with pytest.raises(ConnectError) as info:
        Sudo(sudo_user, python='/nonexistent/python3').call(echo, 1)
    assert str(info.value).startswith('[%s@localhost] could not connect' % sudo_user)
    assert '/nonexistent/python3' in str(info.value)


def test_a_file_where_the_interpreter_should_be(tmp_path):
    not_python = tmp_path / 'python3'
    not_python.write_text('#!/bin/sh\necho "I am not python" >&2\nexit 3\n')
    not_python.chmod(0o755)
    with pytest.raises(ConnectError) as info:
        Local('fake', python=str(not_python)).call(echo, 1)
    assert str(info.value).startswith('[fake] could not connect')
    assert 'I am not python' in str(info.value)


def test_what_a_failed_remote_said_survives_a_first_call_it_never_read(tmp_path):
    # ssh that was refused says why on stderr and exits; the first call, sent
    # behind the agent, may meet the closed pipe before its EOF is read.  Here
    # the call is too big for the pipe, so it is sure to: the pipe closes
    # under it, and the reason comes only after.
    gone = tmp_path / 'python3'
    gone.write_text('#!/bin/sh\nexec 0<&-\nsleep 0.3\necho "ssh: connect to host: Connection refused" >&2\n'
                    'exit 255\n')
    gone.chmod(0o755)
    with pytest.raises(ConnectError) as info:
        Local('refusing', python=str(gone)).call(echo, b'x' * (1 << 20))
    assert str(info.value).startswith('[refusing] could not connect')
    assert 'Connection refused' in str(info.value)

"""A hijacked host, speaking the real protocol, against the connection side:
it cannot stall other tunnels with a reply slow to decode, outrun its
generator credit, send a HELLO that breaks or bloats the controller, grow
the controller's logging state without bound, nor write to its terminal
anything but escaped text under its own name (issue 22, items 5, 6, 8-10)."""
import logging
import os
import stat
import sys
import threading
import time

import pytest

from chopsticks import ConnectError, Local, ProtocolError, RemoteException, codec
from chopsticks import output as output_module
from chopsticks import replies
from chopsticks.output import output_relay
from remote_helpers import echo

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def numbers(n):
    for i in range(n):
        yield i


# --- item 5: a reply slow to decode holds up no other tunnel ------------------------------

SLOW_MARK = b'decode me slowly'


@pytest.fixture
def slow_decoding(monkeypatch):
    """Replies ending with SLOW_MARK take until ``release`` is set to decode
    on the controller (what a hash-collision or huge reply costs, without
    the CPU): ``started`` is set once such a decode began."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    real_decode = codec.decode

    def decode(payload, *args, **kwargs):
        if len(payload) > 1 << 20 and bytes(payload[-len(SLOW_MARK):]) == SLOW_MARK:
            started.set()
            release.wait(60)
            try:
                return real_decode(payload, *args, **kwargs)
            finally:
                finished.set()
        return real_decode(payload, *args, **kwargs)
    monkeypatch.setattr(codec, 'decode', decode)
    yield started, release, finished
    release.set()


def test_a_reply_slow_to_decode_holds_up_no_other_tunnel(slow_decoding):
    """The attacker's reply is read by the thread that reads every tunnel;
    an honest tunnel's generator, read by that same thread, still runs to its
    end while the attacker's reply is being decoded."""
    started, release, finished = slow_decoding
    big = b'\0' * (2 << 20) + SLOW_MARK
    with Local('attacker') as attacker, Local('honest') as honest:
        attacker.connect()
        honest.connect()
        slow = attacker.call_async(echo, big)  # nobody waits: the broker reads the reply
        assert started.wait(30), 'the slow reply never arrived'
        assert list(honest.call_iter(numbers, 100, timeout=20)) == list(range(100))
        assert honest.call_async(echo, 'also fine').result(20) == 'also fine'
        assert not finished.is_set()  # the honest calls finished during the slow decode
        release.set()
        assert slow.result(30) == big
        assert attacker.call(echo, 'after') == 'after'


def big_from(pid, big):
    import os
    return big if os.getpid() == pid else 'fine'


def test_a_group_call_returns_while_one_hosts_reply_is_still_decoding(slow_decoding):
    """One thread reads every host of a group call; the attacker's reply,
    slow to decode, neither delays the honest host's nor the call's timeout."""
    from chopsticks import CallTimeout, Group
    started, release, finished = slow_decoding
    big = b'\0' * (2 << 20) + SLOW_MARK
    with Local('attacker') as attacker, Local('honest') as honest:
        results = Group([attacker, honest]).call(big_from, attacker.remote_info['pid'], big,
                                                 timeout=5)
        assert started.is_set() and not finished.is_set()  # returned during the slow decode
        assert results['honest'] == 'fine'
        assert isinstance(results['attacker'].exception, CallTimeout)
        release.set()
        assert attacker.call(echo, 'after') == 'after'


# --- item 6: generator credit is enforced -------------------------------------------------

def test_a_generator_outrunning_its_credit_closes_its_tunnel_only():
    def ignore_credit(n):
        """Send n items at once, as a host that ignores credit would."""
        import sys
        agent = sys.modules['_chopsticks_agent'].agent
        wire = sys.modules['_chopsticks_wire']
        rid = max(agent.iter_credits)  # this call's
        for i in range(n):
            agent.channel.send_value(rid, wire.ITEM, b'x' * 1000)
        yield 'done'
    with Local('greedy') as greedy, Local('other') as other:
        other.connect()
        with pytest.raises(ProtocolError) as info:
            for _ in greedy.call_iter(ignore_credit, 5000, timeout=30):
                pass
        assert '[greedy]' in str(info.value) and 'credit' in str(info.value)
        assert greedy._conn is None or greedy._conn.closed
        assert list(other.call_iter(numbers, 300, timeout=20)) == list(range(300))
        assert list(greedy.call_iter(numbers, 300, timeout=20)) == list(range(300))  # reconnected


def test_the_agent_and_the_controller_agree_on_the_credit_window():
    with Local() as t:
        assert t.call(lambda: __import__('sys').modules['_chopsticks_agent'].ITER_WINDOW) == \
            replies.ITER_WINDOW


# --- item 8: the HELLO is checked before it is used or cached -----------------------------

FAKE_AGENT = '''#!{python}
# Speaks the protocol's first frame only, as a hijacked agent might.
import sys
sys.path.insert(0, {repo!r})
from chopsticks import codec, wire
sys.stdout.buffer.write(wire.frame(0, wire.HELLO, codec.encode({hello})))
sys.stdout.flush()
sys.stdin.buffer.read()  # until the controller closes
'''


def executable(tmp_path, script):
    """``script`` as an executable file standing for the host's python."""
    path = tmp_path / 'python'
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def fake_python(tmp_path, hello):
    return executable(tmp_path, FAKE_AGENT.format(python=sys.executable, repo=REPO, hello=hello))


def assert_connect_fails(t, said):
    """Connecting ``t`` fails with a ConnectError naming its host and saying ``said``."""
    try:
        with pytest.raises(ConnectError) as info:
            t.connect()
        assert '[%s]' % t.host in str(info.value) and said in str(info.value)
    finally:
        t.close()


GOOD_FIELDS = ("'pid': 1, 'python': 'x', 'platform': 'linux', 'hostname': 'h', "
               "'magic': b'\\x00\\x00\\r\\n'")


@pytest.mark.parametrize('hello', [
    "[1, 2, 3]",                                              # not a dict
    "{%s, 'version': 3}" % GOOD_FIELDS,                       # a bare TypeError once
    "{%s, 'version': ['x' * (4 << 20), 'y']}" % GOOD_FIELDS,  # once cached, 4 MB a file
    "{%s, 'version': 'x' * 300}" % GOOD_FIELDS,
    "{%s, 'version': (3, 11, 2), 'hostname': 7}" % GOOD_FIELDS.replace("'hostname': 'h', ", ''),
])
def test_a_malformed_hello_is_a_connect_error_and_is_not_cached(tmp_path, monkeypatch, hello):
    cache = tmp_path / 'cache'
    monkeypatch.setenv('CHOPSTICKS_CACHE_DIR', str(cache))
    assert_connect_fails(Local('forger', python=fake_python(tmp_path, hello)), 'HELLO')
    facts = [os.path.join(d, f) for d, _, files in os.walk(str(cache / 'facts')) for f in files]
    assert all(os.path.getsize(f) < 4096 for f in facts), facts


BLOATED_AGENT = '''#!{python}
# Announces a HELLO of 200 MiB and writes it all, counting what got through.
import os, struct, sys
sys.path.insert(0, {repo!r})
from chopsticks import wire
size, written, chunk = 200 << 20, 0, b'\\0' * (1 << 20)
try:
    os.write(1, wire.HEADER.pack(size, 0, wire.HELLO))
    while written < size:
        written += os.write(1, chunk)
except OSError:
    pass  # the controller hung up
with open({report!r}, 'w') as f:
    f.write(str(written))
'''


def test_a_bloated_hello_is_refused_before_it_is_read(tmp_path):
    """The frame announcing itself as the HELLO is refused from its header:
    the controller read 200 MiB of it, then refused it, before."""
    report = tmp_path / 'written'
    script = BLOATED_AGENT.format(python=sys.executable, repo=REPO, report=str(report))
    assert_connect_fails(Local('bloater', python=executable(tmp_path, script)),
                         'a HELLO of 209715200 bytes')
    for _ in range(100):  # the agent writes its report once its write fails
        if report.exists() and report.read_text():
            break
        time.sleep(0.1)
    assert int(report.read_text()) < 4 << 20  # what the pipe holds, at most


# --- item 9: logging state is bounded per process -----------------------------------------

def log_names(prefix, count, parts):
    import logging
    for i in range(count):
        name = '.'.join(['%s%d' % (prefix, i)] + ['p%d' % n for n in range(parts - 1)])
        logging.getLogger(name).warning('x')
    return count


def log_levels(count):
    import logging
    log = logging.getLogger('levels')
    for level in range(51, 51 + count):
        log.log(level, 'level %d', level)
    return count


@pytest.fixture
def fresh_logger_budget():
    """The process's budget of logger names for remotes, spent here and
    given back after, so that other tests' remote loggers keep their names."""
    names = set(output_module._remote_logger_names)
    yield
    output_module._remote_logger_names.clear()
    output_module._remote_logger_names.update(names)


def test_remote_logger_names_are_bounded_per_process(caplog, fresh_logger_budget):
    loggers = logging.Logger.manager.loggerDict
    before = len(loggers)
    with caplog.at_level(logging.WARNING):
        for round_ in range(2):  # a reconnect does not start afresh
            with Local('names') as t:
                t.call(log_names, 'r%ddeep' % round_, 300, 12)     # 12 parts: too deep
                t.call(log_names, 'r%dwide' % round_, 1100, 4)
                t.call(echo, 'sync')
        output_relay().drain(10)
    made = len(loggers) - before  # was 12,800: 6,400 a connection
    assert made <= output_module.LOGGER_NAMES_MAX * 4 + 10, made
    assert any(r.name == output_module.REMOTE_LOGGER for r in caplog.records)


def test_remote_log_levels_map_to_the_standard_ones(caplog):
    with caplog.at_level(logging.WARNING), Local('levels') as t:
        t.call(log_levels, 2000)
        t.call(echo, 'sync')
        output_relay().drain(10)
    records = [r for r in caplog.records if getattr(r, 'host', None) == 'levels']
    assert records
    assert {r.levelno for r in records} <= {logging.ERROR, logging.CRITICAL}
    cache = getattr(logging.getLogger('levels'), '_cache', {})
    assert len(cache) <= 5


# --- item 10: what a host prints is escaped, and every line says which host ---------------

def forge_output():
    import logging
    import sys
    sys.stderr.write('harmless\r[db1] FORGED\x1b[2J\x1b]0;title\x07\n')
    sys.stderr.flush()
    log = logging.getLogger('app')
    log.warning('first line\n[db1] FORGED\rsecond \x1b[31mred')
    logging.getLogger('evil\x1b[2Jname').warning('from a strange logger')
    try:
        raise ValueError('boom\x1b[2J')
    except ValueError:
        log.exception('with a traceback\x07')
    return True


def test_remote_output_and_log_records_are_escaped_and_prefixed(capfd, caplog):
    with caplog.at_level(logging.WARNING), Local('web1') as t:
        assert t.call(forge_output)
        t.call(echo, 'sync')
        output_relay().drain(10)
    err = capfd.readouterr().err
    assert '[web1] harmless\\r[db1] FORGED\\x1b[2J\\x1b]0;title\\x07' in err
    records = [r for r in caplog.records if getattr(r, 'host', None) == 'web1']
    assert len(records) == 3
    for record in records:
        text = logging.Formatter('%(name)s %(message)s').format(record)
        assert not any(c in text for c in '\r\x1b\x07'), repr(text)
        assert all(line.startswith('[web1] ') for line in record.getMessage().split('\n'))
        if record.exc_text:
            assert all(line.startswith('[web1] ') for line in record.exc_text.split('\n'))
            assert 'boom\\x1b[2J' in record.exc_text
    assert records[0].getMessage() == '[web1] first line\n[web1] [db1] FORGED\\rsecond \\x1b[31mred'
    assert records[1].name == output_module.REMOTE_LOGGER
    assert records[1].remote_name == 'evil\\x1b[2Jname'


def test_remote_exception_text_is_escaped_when_shown():
    def raise_forged():
        raise ValueError('ok\r\x1b[31m[db1] FORGED\nsecond line')
    with Local('web1') as t:
        with pytest.raises(RemoteException) as info:
            t.call(raise_forged)
    shown = str(info.value)
    assert not any(c in shown for c in '\r\x1b')
    assert '[web1] ValueError: ok\\r\\x1b[31m[db1] FORGED\nsecond line' in shown
    assert info.value.msg == 'ok\r\x1b[31m[db1] FORGED\nsecond line'  # raw, for programs


def test_a_connect_errors_remote_stderr_is_escaped(tmp_path):
    path = tmp_path / 'python'
    path.write_text('#!/bin/sh\nprintf "fine\\r\\033[2Jforged\\n" >&2\nexit 1\n')
    path.chmod(0o755)
    t = Local('web1', python=str(path))
    with pytest.raises(ConnectError) as info:
        t.connect()
    shown = str(info.value)
    assert '\x1b' not in shown and '\r' not in shown
    assert '\n  \\x1b[2Jforged' in shown  # on a line of its own, indented under the error
    assert info.value.stderr.startswith('fine\r\x1b[2J')  # raw, for programs

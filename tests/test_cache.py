"""What the controller keeps between runs (chopsticks.cache): each test runs
real controller processes one after the other against a cache directory of
its own, as a user's scripts would."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from chopsticks import Local, cache

# One controller run: connect to ``host`` (an ssh_config alias), call, and
# say whether the agent went out compiled for the host's Python.
RUN = textwrap.dedent('''
    import sys
    from chopsticks import Tunnel
    host = sys.argv[1]
    t = Tunnel(host, python=sys.argv[2])  # by default the controller's own interpreter
    assert t.call(abs, -2) == 2
    print('compiled' if t.compiled_agent else 'source')
    t.close()
''')


def run(host, cache_dir, python=sys.executable):
    env = dict(os.environ, CHOPSTICKS_CACHE_DIR=str(cache_dir))
    result = subprocess.run([sys.executable, '-c', RUN, host, python], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_later_run_sends_the_agent_compiled_from_its_first_connect(ssh_alias, tmp_path):
    cache_dir = tmp_path / 'cache'
    assert run(ssh_alias, cache_dir) == 'source'  # nothing known yet: the host compiles it
    assert run(ssh_alias, cache_dir) == 'compiled'  # learned: it runs our version
    names = sorted(os.listdir(cache_dir))
    assert 'facts' in names and any(n.startswith('agent-') for n in names)
    assert os.listdir(cache_dir / 'facts')  # the host's python, the ssh client's version
    assert not [n for n in _files(cache_dir) if n.endswith('.tmp')]
    assert os.stat(cache_dir).st_mode & 0o077 == 0  # the user's alone


def _files(directory):
    return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]


def test_a_host_that_changed_its_python_still_connects(ssh_alias, tmp_path, pythons):
    """A stale fact costs bytes, never a connect: the host checks the version
    before it uses compiled code."""
    other = next((p for p in pythons if _version(p) != list(sys.version_info[:2])), None)
    if other is None:
        pytest.skip('no interpreter of another Python version here')
    cache_dir = tmp_path / 'cache'
    shim = tmp_path / 'python3'  # one path on the host, two interpreters over time
    shim.symlink_to(sys.executable)
    assert run(ssh_alias, cache_dir, str(shim)) == 'source'
    assert run(ssh_alias, cache_dir, str(shim)) == 'compiled'
    shim.unlink()
    shim.symlink_to(other)  # "upgraded" under the same name
    assert run(ssh_alias, cache_dir, str(shim)) == 'compiled'  # still believed, and it works
    assert run(ssh_alias, cache_dir, str(shim)) == 'source'  # learned again


def _version(python):
    out = subprocess.run([python, '-c', 'import sys; print(list(sys.version_info[:2]))'],
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_a_damaged_cache_is_ignored_and_mended(ssh_alias, tmp_path):
    cache_dir = tmp_path / 'cache'
    run(ssh_alias, cache_dir)
    for name in _files(cache_dir):
        with open(name, 'rb') as f:
            data = f.read()
        with open(name, 'wb') as f:
            f.write(data[:-100] + b'not what was written')
    assert run(ssh_alias, cache_dir) == 'source'  # the facts are unreadable: asked again
    assert run(ssh_alias, cache_dir) == 'compiled'  # and kept again


def test_an_unwritable_cache_keeps_nothing_and_breaks_nothing(ssh_alias, tmp_path):
    blocked = tmp_path / 'a file'
    blocked.write_text('in the way of the directory')
    assert run(ssh_alias, blocked / 'cache') == 'source'
    assert run(ssh_alias, blocked / 'cache') == 'source'
    assert run(ssh_alias, '') == 'source'  # CHOPSTICKS_CACHE_DIR= keeps nothing


def cache_directory_on_host():
    from chopsticks import cache
    return cache.directory()


def test_nothing_is_kept_on_the_hosts():
    """A relay host runs tunnel code (chopsticks.tunnel): it writes no cache there."""
    with Local() as t:
        assert t.call(cache_directory_on_host) is None
    assert cache.directory() == os.environ['CHOPSTICKS_CACHE_DIR']


def test_old_agent_payloads_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setenv('CHOPSTICKS_CACHE_DIR', str(tmp_path))
    for n in range(12):
        cache.write_blob('agent-%02d.z' % n, b'payload %d' % n, keep=3)
        os.utime(tmp_path / ('agent-%02d.z' % n), (n, n))  # written in this order
    assert sorted(os.listdir(tmp_path)) == ['agent-09.z', 'agent-10.z', 'agent-11.z']
    assert cache.read_blob('agent-11.z') == b'payload 11'


def test_a_cache_that_keeps_nothing_touches_no_files(tmp_path, monkeypatch):
    """Pruning old payloads looks in the cache directory only: with none,
    nothing anywhere is deleted (not the working directory's files)."""
    monkeypatch.setenv('CHOPSTICKS_CACHE_DIR', '')
    monkeypatch.chdir(tmp_path)
    mine = ['agent-%02d.z' % n for n in range(3)]
    for name in mine:
        (tmp_path / name).write_text('a file of the user')
    cache.write_blob('agent-new.z', b'payload', keep=1)
    assert sorted(os.listdir(tmp_path)) == mine


def test_facts_about_many_hosts_stay_bounded_and_the_newest_are_kept(tmp_path, monkeypatch):
    """A fleet, or test runs each with a temporary ssh_config, teach a fact
    per host: each is a file of its own, and past MAX_FACTS the oldest go."""
    monkeypatch.setenv('CHOPSTICKS_CACHE_DIR', str(tmp_path))
    monkeypatch.setattr(cache, 'MAX_FACTS', 8)
    monkeypatch.setattr(cache, 'PRUNE_EVERY', 1)
    (tmp_path / 'facts.json').write_text('{"python": {}}')  # what older versions kept
    for n in range(30):
        key = ['SSHTunnel', 'host%d' % n]
        cache.learn('python', key, [3, n])
        path = tmp_path / cache._fact_name('python', key)
        if path.exists():
            os.utime(path, (n, n))  # learned in this order (mtimes are coarse)
    assert len(os.listdir(tmp_path / 'facts')) <= 8
    assert cache.fact('python', ['SSHTunnel', 'host29']) == [3, 29]
    assert cache.fact('python', ['SSHTunnel', 'host0']) is None  # forgotten
    assert cache.fact('python', ['SSHTunnel', 'host99']) is None  # never learned
    assert not (tmp_path / 'facts.json').exists()

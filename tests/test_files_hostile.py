"""File transfer against hostile hosts and hostile neighbours (issue 22,
items 11, 12, 14), the host half's stdlib-only promise, and sync's plan.

Runs as root, as the attacks matter most there: a root transfer into a tree
that another user owns part of must never be steered outside it.
"""
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from chopsticks import Local, files, files_remote
from chopsticks.errors import RemoteException
from chopsticks.files import TransferError, plan_sync
from conftest import available_pythons
import hostile_files

FILES_REMOTE = files_remote.__file__


@pytest.fixture
def local(sshd):
    with Local() as t:
        yield t


def open_fds():
    return set(os.listdir('/proc/self/fd'))


def victim_dir(tmp_path):
    victim = tmp_path / hostile_files.VICTIM
    victim.mkdir()
    (victim / 'same').write_bytes(b'same bytes')
    (victim / 'extra').write_bytes(b'victim only')
    os.chmod(str(victim / 'same'), 0o644)
    return victim


def snapshot(root):
    return sorted((p.relative_to(root).as_posix(), p.read_bytes(), oct(p.stat().st_mode))
                  for p in root.rglob('*') if p.is_file())


def local_tree(tmp_path):
    src = tmp_path / 'src'
    (src / 'sub').mkdir(parents=True)
    (src / 'sub' / 'same').write_bytes(b'same bytes')
    os.chmod(str(src / 'sub' / 'same'), 0o600)
    (src / 'sub' / 'new').write_bytes(b'new bytes')
    return src


# --- the host half: stdlib only, Python 3.6 ----------------------------------------------

AUDIT = r'''
import importlib.util, sys, sysconfig
spec = importlib.util.spec_from_file_location('files_remote', sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
stdlib = sysconfig.get_paths()['stdlib']
outside = sorted(name for name, m in sys.modules.items()
                 if getattr(m, '__file__', None) and name != 'files_remote'
                 and (not m.__file__.startswith(stdlib) or 'site-packages' in m.__file__))
print(repr(outside))
'''


def oldest_python():
    pythons = available_pythons()
    if not pythons:
        pytest.skip('no pyenv Python 3.6-3.14 found')
    return pythons[0]


def test_the_host_half_imports_only_the_stdlib_on_the_oldest_python(tmp_path):
    """files_remote is all a transfer ships to a host: it must import on
    the oldest Python we support with nothing but the standard library
    (-I -S: no site-packages, no user site, no working directory)."""
    python = oldest_python()
    copy = tmp_path / 'files_remote.py'  # alone in its directory: no chopsticks beside it
    copy.write_bytes(open(FILES_REMOTE, 'rb').read())
    out = subprocess.run([python, '-I', '-S', '-c', AUDIT, str(copy)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]', 'non-stdlib imports: ' + out.stdout


def test_modules_a_relay_host_imports_compile_on_the_oldest_python():
    python = oldest_python()
    for module in (files, files_remote, sys.modules['chopsticks.files_source'],
                   sys.modules['chopsticks.progress']):
        out = subprocess.run([python, '-I', '-S', '-c',
                              'import sys; compile(open(sys.argv[1]).read(), sys.argv[1], "exec")',
                              module.__file__], stderr=subprocess.PIPE, universal_newlines=True)
        assert out.returncode == 0, out.stderr


def test_the_audit_catches_a_non_stdlib_import(tmp_path):
    """The audit above can fail: a module importing chopsticks is caught."""
    python = oldest_python()
    bad = tmp_path / 'files_remote.py'
    bad.write_text('import chopsticks\n')
    out = subprocess.run([python, '-I', '-S', '-c', AUDIT, str(bad)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True)
    assert out.returncode != 0 and 'chopsticks' in out.stderr


# --- item 11: symlinks planted in the destination -----------------------------------------

def test_sync_refuses_a_symlinked_destination_root(local, tmp_path):
    victim = victim_dir(tmp_path)
    before = snapshot(victim)
    src = local_tree(tmp_path)
    dest = tmp_path / 'tree'
    dest.symlink_to(victim)
    with pytest.raises(TransferError) as info:
        local.sync(str(src), str(dest), delete=True)
    message = str(info.value)
    assert message.startswith('[%s] sync' % local.host) and str(dest) in message
    assert 'symlink' in message
    assert snapshot(victim) == before
    with pytest.raises(RemoteException):
        local.call(files_remote.remote_delete, str(dest), ['extra'])
    assert snapshot(victim) == before


def test_a_planted_symlinked_subdirectory_is_replaced_not_followed(local, tmp_path):
    victim = victim_dir(tmp_path)
    before = snapshot(victim)
    src = local_tree(tmp_path)
    dest = tmp_path / 'tree'
    dest.mkdir()
    (dest / 'sub').symlink_to(victim)
    with pytest.raises(TransferError) as info:
        local.sync(str(src), str(dest))  # without delete: a different kind is refused
    assert 'sub' in str(info.value)
    report = local.sync(str(src), str(dest), delete=True)
    assert 'sub/' in report['updated']
    assert not (dest / 'sub').is_symlink() and (dest / 'sub' / 'new').read_bytes() == b'new bytes'
    assert snapshot(victim) == before


def test_a_directory_swapped_for_a_symlink_mid_sync_is_not_followed(local, tmp_path,
                                                                   monkeypatch):
    """Between sync's plan and its work, the host's ``sub`` becomes a link
    to a victim directory: no delete, write or chmod reaches the victim."""
    victim = victim_dir(tmp_path)
    before = snapshot(victim)
    src = local_tree(tmp_path)
    dest = tmp_path / 'tree'
    (dest / 'sub').mkdir(parents=True)
    (dest / 'sub' / 'same').write_bytes(b'same bytes')  # mode differs: a chmod is planned
    (dest / 'sub' / 'extra').write_bytes(b'gone with delete')  # a delete is planned
    monkeypatch.setattr(files_remote, 'remote_tree_state', hostile_files.tree_state_then_swap_sub)
    for delete in (True, False):  # the delete fails first; without it, the put
        with pytest.raises(TransferError) as info:
            local.sync(str(src), str(dest), delete=delete)
        message = str(info.value)
        assert message.startswith('[%s] sync' % local.host), message
        assert str(dest / 'sub') in message and 'symlink' in message, message
        assert snapshot(victim) == before
        os.unlink(str(dest / 'sub'))
        os.rename(str(dest / 'sub.moved'), str(dest / 'sub'))


def test_host_chmod_and_delete_never_follow_links(local, tmp_path):
    victim = victim_dir(tmp_path)
    before = snapshot(victim)
    dest = tmp_path / 'tree'
    dest.mkdir()
    (dest / 'sub').symlink_to(victim)
    (dest / 'file').symlink_to(victim / 'same')
    for rels in (['sub/same'], ['file']):
        with pytest.raises(RemoteException):
            local.call(files_remote.remote_chmod, str(dest), [(rels[0], 0o777)])
    with pytest.raises(RemoteException):
        local.call(files_remote.remote_delete, str(dest), ['sub/extra'])
    assert snapshot(victim) == before
    local.call(files_remote.remote_delete, str(dest), ['sub', 'file'])  # links themselves go
    assert os.listdir(str(dest)) == [] and snapshot(victim) == before


def test_fetch_never_writes_through_a_planted_local_symlink(local, tmp_path):
    """The controller's own writes: a fetched tree's ``sub`` is a link to a
    victim directory here; nothing is written through it."""
    victim = victim_dir(tmp_path)
    before = snapshot(victim)
    src = local_tree(tmp_path)
    dest = tmp_path / 'fetched'
    (dest / 'src').mkdir(parents=True)
    (dest / 'src' / 'sub').symlink_to(victim)
    with pytest.raises(TransferError) as info:
        local.fetch(str(src), str(dest))
    assert info.value.host == local.host and 'symlink' in str(info.value)
    assert str(dest / 'src' / 'sub') in str(info.value)
    assert snapshot(victim) == before


# --- item 12: the controller's own files while putting -------------------------------------

def swap_after_walk(monkeypatch, swap):
    """Run ``swap()`` right after put's (or sync's) walk of the local tree."""
    real_walk = files.walk

    def walk_then_swap(dirs, ids=None):
        listing = real_walk(dirs, ids)
        swap()
        return listing
    monkeypatch.setattr(files, 'walk', walk_then_swap)


@pytest.mark.parametrize('operation', ['put', 'sync'])
@pytest.mark.parametrize('how', ['symlink', 'other file'])
def test_a_source_swapped_after_the_walk_is_never_sent(local, tmp_path, monkeypatch, operation,
                                                       how):
    secret = tmp_path / 'secret'
    secret.write_bytes(b'TOPSECRET')
    os.chmod(str(secret), 0o600)
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'a').write_bytes(b'harmless')  # about the secret's size: sizes do not tell
    dest = tmp_path / 'dest'

    def swap():
        os.unlink(str(src / 'a'))
        if how == 'symlink':
            os.symlink(str(secret), str(src / 'a'))
        else:
            os.link(str(secret), str(src / 'a'))
    swap_after_walk(monkeypatch, swap)
    with pytest.raises(TransferError) as info:
        getattr(local, operation)(str(src), str(dest))
    assert info.value.host == local.host and str(src / 'a') in str(info.value)
    sent = [p.read_bytes() for p in dest.rglob('*') if p.is_file()] if dest.exists() else []
    assert not any(b'TOPSECRET' in data for data in sent)


# --- item 14: malformed listings from a hijacked host --------------------------------------

@pytest.mark.parametrize('hostile', ['send_bad_mode', 'send_bad_file_entry', 'send_bad_dir_entry',
                                     'send_bad_size'])
def test_a_malformed_tree_listing_is_a_transfer_error_that_leaks_nothing(local, tmp_path,
                                                                        monkeypatch, hostile):
    src = tmp_path / 'src'
    src.mkdir()
    dest = tmp_path / 'dest'
    dest.mkdir()
    monkeypatch.setattr(files_remote, 'remote_send', getattr(hostile_files, hostile))
    local.call(len, '')  # connected: the connection's own descriptors are open already
    before = open_fds()
    with pytest.raises(TransferError) as info:
        local.fetch(str(src), str(dest))
    message = str(info.value)
    assert message.startswith('[%s] fetch' % local.host) and 'malformed tree entry' in message
    assert info.value.host == local.host
    leftovers = [str(p) for p in dest.rglob('*') if '.chopsticks-' in p.name or p.is_file()]
    assert leftovers == []
    assert open_fds() <= before | {str(fd) for fd in range(3)}


# --- sync's plan, without a host -----------------------------------------------------------

LISTING = ([('d', 0o755)], [('d/f', 3, 0o644), ('g', 1, 0o600)], [('l', 'target')], [])
DIGESTS = {'d/f': 'aa', 'g': 'bb'}


def test_plan_for_a_missing_tree_sends_everything():
    plan = plan_sync(LISTING, DIGESTS, None, delete=True)
    assert plan.report() == {'created': ['d/', 'd/f', 'g', 'l'], 'updated': [], 'deleted': [],
                             'unchanged': 0}
    assert plan.listing[:3] == LISTING[:3] and plan.removals == [] and plan.chmods == []


def test_plan_sends_only_what_differs_and_chmods_equal_content():
    remote = {'d': ('d', 0o755), 'd/f': ('f', 3, 0o600, 'aa'), 'g': ('f', 1, 0o600, 'zz'),
              'l': ('l', 'target'), 'old': ('f', 1, 0o644, None), 'olddir': ('d', 0o700),
              'olddir/x': ('f', 1, 0o644, None)}
    plan = plan_sync(LISTING, DIGESTS, remote, delete=True)
    assert plan.report() == {'created': [], 'updated': ['d/f', 'g'],
                             'deleted': ['old', 'olddir/'], 'unchanged': 1}
    assert plan.listing[1] == [('g', 1, 0o600)] and plan.chmods == [('d/f', 0o644)]
    assert plan.removals == ['olddir', 'old'] and plan.listing[0] == [('d', 0o755)]
    assert plan_sync(LISTING, DIGESTS, remote, delete=False).deleted == []


def test_plan_reports_a_different_kind_as_a_conflict():
    remote = {'d': ('f', 1, 0o644, None), 'l': ('d', 0o755)}
    plan = plan_sync(LISTING, DIGESTS, remote, delete=False)
    assert sorted(plan.conflicts) == ['d', 'l'] and sorted(plan.removals) == ['d', 'l']


names = st.sampled_from(['a', 'b', 'c'])
rels = st.lists(names, min_size=1, max_size=3).map('/'.join)
modes = st.sampled_from([0o600, 0o644, 0o755])
entries = st.one_of(
    st.tuples(st.just('d'), modes),
    st.tuples(st.just('f'), st.integers(0, 2), modes, st.sampled_from(['x', 'y'])),
    st.tuples(st.just('l'), st.sampled_from(['t1', 't2'])))


def _tree_of(entries_by_rel):
    """A consistent tree from arbitrary entries: every parent a directory."""
    tree = {}
    for rel in sorted(entries_by_rel, key=lambda r: r.count('/')):
        parts = rel.split('/')
        if all(tree.get('/'.join(parts[:i]), ('d',))[0] == 'd' for i in range(1, len(parts))):
            for i in range(1, len(parts)):
                tree.setdefault('/'.join(parts[:i]), ('d', 0o755))
            tree.setdefault(rel, entries_by_rel[rel])
    return tree


def _apply(plan, remote, digests):
    """The host after the plan: removals, then the put, then the chmods."""
    after = dict(remote)
    for rel in plan.removals:
        for other in [r for r in after if r == rel or r.startswith(rel + '/')]:
            del after[other]
    dirs, files_, links, _ = plan.listing
    for rel, mode in dirs:
        after[rel] = ('d', mode)
    for rel, size, mode in files_:
        after[rel] = ('f', size, mode, digests[rel])
    for rel, target in links:
        after[rel] = ('l', target)
    for rel, mode in plan.chmods:
        after[rel] = after[rel][:2] + (mode,) + after[rel][3:]
    return after


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(rels, entries, max_size=8), st.dictionaries(rels, entries, max_size=8))
def test_a_plan_with_delete_makes_the_host_equal_the_local_tree(local_entries, remote_entries):
    # A file's digest is its content and size; the host hashes only the
    # files whose size equals the local one's (remote_tree_state).
    here = {rel: e[:3] + (e[3] + str(e[1]),) if e[0] == 'f' else e
            for rel, e in _tree_of(local_entries).items()}
    there = {rel: e[:3] + (e[3] + str(e[1]) if here.get(rel, ())[1:2] == e[1:2] else None,)
             if e[0] == 'f' else e for rel, e in _tree_of(remote_entries).items()}
    listing = ([(r, e[1]) for r, e in sorted(here.items()) if e[0] == 'd'],
               [(r, e[1], e[2]) for r, e in sorted(here.items()) if e[0] == 'f'],
               [(r, e[1]) for r, e in sorted(here.items()) if e[0] == 'l'], [])
    digests = {r: e[3] for r, e in here.items() if e[0] == 'f'}
    plan = plan_sync(listing, digests, there, delete=True)
    assert _apply(plan, there, digests) == here
    report = plan.report()
    changed = set(report['created']) | set(report['updated'])
    assert len(changed) + report['unchanged'] + sum(e[0] == 'd' for r, e in here.items()
                                                    if r + '/' not in changed) == len(here)


def test_a_malformed_file_header_is_a_transfer_error(local, tmp_path, monkeypatch):
    src = tmp_path / 'src'
    src.write_bytes(b'abc')
    monkeypatch.setattr(files_remote, 'remote_send', hostile_files.send_file_bad_mode)
    with pytest.raises(TransferError) as info:
        local.fetch(str(src), str(tmp_path / 'dest'))
    assert str(info.value).startswith('[%s] fetch' % local.host) and 'rw-r--r--' in str(info.value)
    assert not (tmp_path / 'dest').exists()
    assert [p for p in os.listdir(str(tmp_path)) if '.chopsticks-' in p] == []


def test_a_malformed_tree_state_is_a_transfer_error(local, tmp_path, monkeypatch):
    src = local_tree(tmp_path)
    dest = tmp_path / 'dest'
    dest.mkdir()
    monkeypatch.setattr(files_remote, 'remote_tree_state', hostile_files.tree_state_malformed)
    with pytest.raises(TransferError) as info:
        local.sync(str(src), str(dest), delete=True)
    assert str(info.value).startswith('[%s] sync' % local.host)
    assert 'malformed tree state' in str(info.value) and os.listdir(str(dest)) == []


def test_another_users_symlink_in_a_shared_directory_steers_no_root_sync(local, sudo_user,
                                                                        tmp_path):
    """The issue's case as it happens: another user (a real one, through a
    Sudo tunnel) makes the destination in a directory both may write a link
    to root's victim directory; root's ``sync(delete=True)`` refuses it."""
    import shutil
    import tempfile
    from chopsticks import Sudo
    victim = victim_dir(tmp_path)
    before = snapshot(victim)
    src = local_tree(tmp_path)
    shared = tempfile.mkdtemp(prefix='chopsticks-shared-')
    try:
        os.chmod(shared, 0o777)  # writable by both, and not sticky (no kernel link protection)
        dest = os.path.join(shared, 'tree')
        with Sudo(sudo_user) as attacker:
            attacker.call(os.symlink, str(victim), dest)
        with pytest.raises(TransferError) as info:
            local.sync(str(src), dest, delete=True)
        assert str(info.value).startswith('[%s] sync' % local.host) and dest in str(info.value)
        assert snapshot(victim) == before
    finally:
        shutil.rmtree(shared)


def test_wide_and_deep_trees_round_trip_without_leaking_descriptors(local, tmp_path):
    """More directories than the descriptors a transfer keeps open (Dirs.CACHED)."""
    src = tmp_path / 'src'
    deep = src.joinpath(*['d%d' % i for i in range(files_remote.Dirs.CACHED + 4)])
    deep.mkdir(parents=True)
    (deep / 'bottom').write_bytes(b'deep')
    for i in range(files_remote.Dirs.CACHED * 2):
        wide = src / ('w%02d' % i)
        wide.mkdir()
        (wide / 'f').write_bytes(b'%d' % i)
    local.call(len, '')
    before = open_fds()
    local.put(str(src), str(tmp_path / 'put'))
    local.fetch(str(tmp_path / 'put'), str(tmp_path / 'fetched'))
    report = local.sync(str(src), str(tmp_path / 'synced'))
    cached = files_remote.Dirs.CACHED
    assert len(report["created"]) == 2 * (cached * 2) + cached + 5  # dirs and files
    assert local.sync(str(src), str(tmp_path / 'synced'))['unchanged'] == 2 * cached + 1
    for copy in ('put', 'fetched', 'synced'):
        assert snapshot(tmp_path / copy) == snapshot(src)
    assert open_fds() <= before | {str(fd) for fd in range(3)}

"""put, fetch and sync over real tunnels: Local, OpenSSH and paramiko to a loopback sshd.

The "remote" shares this machine's filesystem, so the tests look at what
arrived directly.  Files are bigger than any pipe or SSH window so streaming,
flow control and checksums are really exercised.
"""
import errno
import hashlib
import os
import signal
import stat
import subprocess
import tempfile

import pytest

from chopsticks import Local, Sudo, Tunnel, TunnelClosed
from chopsticks import files, files_remote
from chopsticks.errors import RemoteException
from chopsticks.files import TransferError
from conftest import available_pythons
import remote_helpers
from killed_controller import kill_controller_mid_write, leftovers

BIG = 20 << 20  # well past the 64 KiB pipe buffer, the 8 MiB stream window and SSH windows


@pytest.fixture(scope='module')
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('src') / 'big.bin'
    data = os.urandom(BIG)
    path.write_bytes(data)
    return str(path), hashlib.sha256(data).hexdigest(), hashlib.sha1(data).hexdigest()


def _tunnel(kind):
    if kind == 'local':
        return Local()
    return Tunnel('host1', transport=kind)


@pytest.fixture(scope='module', params=['local', 'openssh', 'paramiko'])
def tunnel(request, sshd):
    t = _tunnel(request.param)
    yield t
    t.close()


@pytest.fixture
def local(sshd):
    with Local() as t:
        yield t


def sha256_of(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- single files ---------------------------------------------------------------------

def test_put_then_fetch_keeps_bytes_and_modes(tunnel, big_file, tmp_path):
    src, sha256, sha1 = big_file
    remote = str(tmp_path / 'remote.bin')
    result = tunnel.put(src, remote, mode=0o640)
    assert result == {'remote_path': remote, 'size': BIG, 'sha1sum': sha1, 'mode': 0o640}
    assert sha256_of(remote) == sha256 and mode_of(remote) == 0o640

    back = str(tmp_path / 'back.bin')
    result = tunnel.fetch(remote, back)
    assert result == {'local_path': back, 'remote_path': remote, 'size': BIG, 'sha1sum': sha1,
                      'mode': 0o640}
    assert sha256_of(back) == sha256 and mode_of(back) == 0o640
    assert tunnel.fetch(remote, back, mode=0o600)['mode'] == 0o600 and mode_of(back) == 0o600
    assert leftovers(tmp_path) == []


def test_replaces_an_existing_file(tunnel, tmp_path):
    src = tmp_path / 'new'
    src.write_bytes(b'new contents')
    dest = tmp_path / 'dest'
    dest.write_bytes(b'old contents that are longer')
    tunnel.put(str(src), str(dest))
    assert dest.read_bytes() == b'new contents'
    src.write_bytes(b'')
    assert tunnel.put(str(src), str(dest))['size'] == 0 and dest.read_bytes() == b''


def test_no_destination_means_a_temporary_file(local, tmp_path):
    src = tmp_path / 'data.txt'
    src.write_bytes(b'hello')
    put = local.put(str(src))
    try:
        assert open(put['remote_path'], 'rb').read() == b'hello'
        assert put['remote_path'].endswith('data.txt')
        fetched = local.fetch(put['remote_path'])
        try:
            assert open(fetched['local_path'], 'rb').read() == b'hello'
            assert fetched['local_path'] != put['remote_path']
        finally:
            os.unlink(fetched['local_path'])
    finally:
        os.unlink(put['remote_path'])


def test_an_existing_directory_receives_the_file_inside(local, tmp_path):
    src = tmp_path / 'report.csv'
    src.write_bytes(b'a,b\n')
    remote_dir = tmp_path / 'remote'
    remote_dir.mkdir()
    assert local.put(str(src), str(remote_dir))['remote_path'] == str(remote_dir / 'report.csv')
    local_dir = tmp_path / 'local'
    local_dir.mkdir()
    got = local.fetch(str(remote_dir / 'report.csv'), str(local_dir))
    assert got['local_path'] == str(local_dir / 'report.csv')
    assert (local_dir / 'report.csv').read_bytes() == b'a,b\n'


def test_remote_paths_are_relative_to_the_remote_home(local, tmp_path):
    src = tmp_path / 'f'
    src.write_bytes(b'x')
    name = 'chopsticks-test-%d' % os.getpid()
    home = os.path.expanduser('~')
    os.mkdir(os.path.join(home, name))
    try:
        assert local.put(str(src), name + '/a')['remote_path'] == os.path.join(home, name, 'a')
        assert local.put(str(src), '~/%s/b' % name)['remote_path'] == os.path.join(home, name, 'b')
        assert local.fetch(name + '/b', str(tmp_path / 'b'))['remote_path'] == os.path.join(home, name, 'b')
    finally:
        subprocess.run(['rm', '-rf', os.path.join(home, name)], check=True)


def test_mode_none_keeps_the_local_mode(local, tmp_path):
    src = tmp_path / 'script.sh'
    src.write_bytes(b'#!/bin/sh\n')
    os.chmod(str(src), 0o751)
    assert local.put(str(src), str(tmp_path / 'copy'), mode=None)['mode'] == 0o751
    assert mode_of(str(tmp_path / 'copy')) == 0o751


def test_old_python_on_the_remote(tmp_path, big_file):
    pythons = [p for p in available_pythons() if p.endswith('3.6')]
    if not pythons:
        pytest.skip('no Python 3.6 installed')
    src, _, sha1 = big_file
    with Local(python=pythons[0]) as t:
        assert t.put(src, str(tmp_path / 'r'))['sha1sum'] == sha1
        assert t.fetch(str(tmp_path / 'r'), str(tmp_path / 'l'))['sha1sum'] == sha1
        tree = _make_tree(tmp_path / 'tree')
        t.put(str(tree), str(tmp_path / 'rtree'))
        assert _snapshot(tmp_path / 'rtree') == _snapshot(tree)


# --- interrupted transfers ------------------------------------------------------------

def _kill_after(tunnel, nbytes):
    pid = tunnel.remote_info['pid']

    def progress(done, total):
        if done >= nbytes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return progress


def _interrupt_after(nbytes):
    """A progress callback that acts as Ctrl-C once ``nbytes`` have moved."""
    def progress(done, total):
        if done >= nbytes:
            raise KeyboardInterrupt
    return progress


@pytest.mark.parametrize('kind', ['local', 'openssh'])
def test_remote_killed_during_put_leaves_the_old_file(sshd, kind, big_file, tmp_path):
    src, _, _ = big_file
    dest = tmp_path / 'dest'
    dest.write_bytes(b'precious')
    t = _tunnel(kind)
    try:
        with pytest.raises(TunnelClosed) as info:
            t.put(src, str(dest), progress=_kill_after(t, 4 << 20))
        assert 'put' in str(info.value) and str(dest) in str(info.value)
        assert dest.read_bytes() == b'precious'
        # The killed agent could not remove its temp file; the next transfer to
        # the same file does.
        assert len(leftovers(tmp_path)) <= 1
        small = tmp_path / 'small'
        small.write_bytes(b'next')
        t.put(str(small), str(dest))  # reconnects
        assert dest.read_bytes() == b'next' and leftovers(tmp_path) == []
    finally:
        t.close()


@pytest.mark.parametrize('kind', ['local', 'openssh', 'paramiko'])
def test_a_file_that_shrinks_while_it_is_put_fails_and_changes_nothing(sshd, kind, big_file,
                                                                       tmp_path):
    """The bytes go out from the file itself (sendfile) while a thread hashes
    them: a file cut short meanwhile fails the put, the old file stays, and
    the tunnel goes on working."""
    src = tmp_path / 'growing.log'
    with open(big_file[0], 'rb') as f:
        src.write_bytes(f.read())
    dest = tmp_path / 'dest'
    dest.write_bytes(b'precious')

    def truncate_after(done, total):
        if done >= 4 << 20:
            os.truncate(src, 1000)

    t = _tunnel(kind)
    try:
        with pytest.raises((TransferError, RemoteException)) as info:
            t.put(str(src), str(dest), progress=truncate_after)
        assert 'put' in str(info.value) and (kind == 'local' or 'host1' in str(info.value))
        assert dest.read_bytes() == b'precious'
        assert leftovers(tmp_path) == []
        assert t.call(remote_helpers.echo, 'still here') == 'still here'
    finally:
        t.close()


@pytest.mark.parametrize('kind', ['local', 'openssh'])
def test_remote_killed_during_fetch_leaves_the_old_file(sshd, kind, tmp_path):
    src = tmp_path / 'src'
    with open(str(src), 'wb') as f:
        f.write(os.urandom(48 << 20))  # more than the 16 MiB the host may send ahead
    dest = tmp_path / 'local'
    dest.mkdir()
    (dest / 'src').write_bytes(b'precious')
    t = _tunnel(kind)
    try:
        with pytest.raises(TunnelClosed):
            t.fetch(str(src), str(dest), progress=_kill_after(t, 4 << 20))
        assert (dest / 'src').read_bytes() == b'precious'
        assert leftovers(dest) == []
    finally:
        t.close()


def test_interrupting_put_removes_the_remote_temp_file(local, big_file, tmp_path):
    src, _, _ = big_file
    dest = tmp_path / 'dest'
    dest.write_bytes(b'precious')

    with pytest.raises(KeyboardInterrupt):
        local.put(src, str(dest), progress=_interrupt_after(4 << 20))
    # The host removes its temp file when it learns of the abort, just after.
    for _ in range(100):
        if not leftovers(tmp_path):
            break
        local.call(__import__('time').sleep, 0.05)
    assert leftovers(tmp_path) == [] and dest.read_bytes() == b'precious'
    assert local.call(sum, [1, 2]) == 3  # the tunnel is still usable


def test_interrupting_fetch_removes_the_local_temp_file(local, big_file, tmp_path):
    src, _, _ = big_file
    dest = tmp_path / 'dest'
    dest.write_bytes(b'precious')

    with pytest.raises(KeyboardInterrupt):
        local.fetch(src, str(dest), progress=_interrupt_after(4 << 20))
    assert leftovers(tmp_path) == [] and dest.read_bytes() == b'precious'
    assert local.fetch(src, str(dest))['size'] == BIG


def test_a_checksum_mismatch_changes_nothing(local, tmp_path):
    dest = tmp_path / 'dest'
    dest.write_bytes(b'precious')
    data = b'x' * 100000
    corrupted = [data, hashlib.sha1(b'something else').digest()]
    spec = {'kind': 'file', 'name': 'dest', 'files': [('', len(data), 0o644)]}
    with pytest.raises(RemoteException) as info:
        local.call_stream(files_remote.remote_receive, corrupted, str(dest), spec)
    assert 'checksum mismatch' in str(info.value)
    assert dest.read_bytes() == b'precious' and leftovers(tmp_path) == []


def test_a_fetch_whose_bytes_do_not_match_the_hosts_digest_changes_nothing(local, tmp_path,
                                                                           monkeypatch):
    src = tmp_path / 'src'
    src.write_bytes(b'y' * 100000)
    dest = tmp_path / 'dest'
    dest.write_bytes(b'precious')
    monkeypatch.setattr(files_remote, 'remote_send', remote_helpers.send_with_a_wrong_digest)
    with pytest.raises(TransferError) as info:
        local.fetch(str(src), str(dest))
    assert 'checksum mismatch' in str(info.value) and info.value.host == local.host
    assert dest.read_bytes() == b'precious' and leftovers(tmp_path) == []


def test_a_short_stream_changes_nothing(local, tmp_path):
    dest = tmp_path / 'dest'
    spec = {'kind': 'file', 'name': 'dest', 'files': [('', 1000, 0o644)]}
    with pytest.raises(RemoteException) as info:
        local.call_stream(files_remote.remote_receive, [b'x' * 10], str(dest), spec)
    assert 'ended early' in str(info.value)
    assert not dest.exists() and leftovers(tmp_path) == []


# --- errors ----------------------------------------------------------------------------

def test_missing_local_file(local, tmp_path):
    with pytest.raises(TransferError) as info:
        local.put(str(tmp_path / 'nope'), str(tmp_path / 'x'))
    e = info.value
    assert e.errno == errno.ENOENT and e.host == local.host and e.operation == 'put'
    assert str(e).startswith('[%s] put %s' % (local.host, tmp_path / 'nope'))
    assert isinstance(e, OSError)


def test_missing_remote_file(tunnel, tmp_path):
    with pytest.raises(TransferError) as info:
        tunnel.fetch(str(tmp_path / 'nope'), str(tmp_path / 'x'))
    assert info.value.errno == errno.ENOENT
    assert str(info.value).startswith('[%s] fetch %s' % (tunnel.host, tmp_path / 'nope'))
    assert 'FileNotFoundError' in str(info.value)
    assert not (tmp_path / 'x').exists()


def test_a_directory_where_a_file_is_expected(local, tmp_path):
    src = tmp_path / 'name'
    src.write_bytes(b'x')
    remote = tmp_path / 'remote'
    (remote / 'name').mkdir(parents=True)
    with pytest.raises(TransferError) as info:
        local.put(str(src), str(remote))
    assert info.value.errno == errno.EISDIR and str(remote / 'name') in str(info.value)
    with pytest.raises(TransferError) as info:
        local.put(str(src), str(tmp_path / 'no-such-dir' / 'f'))
    assert info.value.errno == errno.ENOENT and 'does not exist' in str(info.value)


def test_permission_denied_on_fetch(sudo_user, tmp_path):
    secret = tmp_path / 'secret'
    secret.write_bytes(b'root only')
    os.chmod(str(secret), 0o600)
    os.chmod(str(tmp_path), 0o755)
    with Sudo(sudo_user) as t:
        with pytest.raises(TransferError) as info:
            t.fetch(str(secret), str(tmp_path / 'copy'))
    e = info.value
    assert e.errno == errno.EACCES and e.host == t.host
    assert 'permission denied' in str(e).lower() and str(secret) in str(e)
    assert not (tmp_path / 'copy').exists()


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (root only)."""
    mount = tmp_path / 'tiny'
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount)],
            stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip('cannot mount a small tmpfs here')
    try:
        yield mount
    finally:
        subprocess.run(['umount', str(mount)], check=True)


def test_disk_full(local, big_file, tiny_fs):
    src, _, _ = big_file
    (tiny_fs / 'f').write_bytes(b'old')
    with pytest.raises(TransferError) as info:
        local.put(src, str(tiny_fs / 'f'))
    assert info.value.errno == errno.ENOSPC and 'out of disk space' in str(info.value)
    assert (tiny_fs / 'f').read_bytes() == b'old' and leftovers(tiny_fs) == []
    with pytest.raises(TransferError) as info:
        local.fetch(src, str(tiny_fs / 'f'))
    assert info.value.errno == errno.ENOSPC and 'this machine' in str(info.value)
    assert (tiny_fs / 'f').read_bytes() == b'old' and leftovers(tiny_fs) == []


def test_unsafe_paths_from_a_host_are_refused():
    for rel in ('../x', '/etc/passwd', 'a/../../b', '', 'a//b', '.', 'a/./b', 'a\0b'):
        with pytest.raises(TransferError):
            files._check_rel('evil', rel)
    assert files._check_rel('h', 'a/b.c') == 'a/b.c'


def test_a_killed_transfers_temp_file_is_swept(local, tmp_path):
    dest = tmp_path / 'dest'
    dead = subprocess.Popen(['true'])
    dead.wait()
    stale = tmp_path / ('.dest.chopsticks-%s-%d-abcd' % (files_remote._host_tag(), dead.pid))
    stale.write_bytes(b'partial')
    other_host = tmp_path / ('.dest.chopsticks-zzzzzz-%d-abcd' % dead.pid)
    other_host.write_bytes(b'not ours to judge')
    src = tmp_path / 'src'
    src.write_bytes(b'x')
    local.put(str(src), str(dest))
    assert not stale.exists() and other_host.exists()


# 80 CJK characters: 240 bytes, a valid name (NAME_MAX is 255 bytes) that a
# temp name cut by characters, not bytes, made too long.  And 250 bytes that
# are not UTF-8: a surrogate-escaped name, one character per byte.
LONG_NAMES = ['\u914d' * 80, os.fsdecode(b'\xff' * 250)]


@pytest.mark.parametrize('name', LONG_NAMES, ids=['cjk-240-bytes', 'undecodable-250-bytes'])
def test_names_near_name_max_put_fetch_and_sync(local, tmp_path, name):
    src = tmp_path / 'src'
    src.mkdir()
    (src / name).write_bytes(b'long name')
    dest = tmp_path / 'dest'
    dest.mkdir()
    local.put(str(src / name), str(dest / name))
    assert (dest / name).read_bytes() == b'long name'
    (src / name).write_bytes(b'fetched')
    local.fetch(str(src / name), str(dest / name))
    assert (dest / name).read_bytes() == b'fetched'
    result = local.sync(str(src), str(tmp_path / 'synced'))
    assert result['created'] == [name] and (tmp_path / 'synced' / name).read_bytes() == b'fetched'
    assert leftovers(dest) == [] and leftovers(tmp_path / 'synced') == []


def test_a_temp_name_fits_name_max_whatever_the_encoding():
    for name in LONG_NAMES + ['a' * 255, '\U0001f600' * 63, 'short']:
        # the longest a temp name gets: a 7-digit pid (Linux's pid_max is 4194304)
        temp = files_remote._temp_prefix(name) + '%s-%d-%s' % (files_remote._host_tag(),
                                                               4194304, 'ffffffff')
        assert len(os.fsencode(temp)) <= 255
        assert name.startswith(files_remote.fit_name(name))
    assert files_remote.fit_name('short') == 'short'
    assert files_remote.fit_name('\u914d' * 80) == '\u914d' * 66  # cut between characters


def test_put_into_a_directory_the_user_cannot_write_names_the_destination(sudo_user):
    # not under tmp_path: pytest's base directory is root's alone (0700)
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o755)
        read_only = os.path.join(base, 'ro')
        os.mkdir(read_only, 0o755)  # root's: the sudo user may not create a file in it
        src = os.path.join(base, 'src')
        with open(src, 'wb') as f:
            f.write(b'x')
        os.chmod(src, 0o644)
        with Sudo(sudo_user) as t:
            with pytest.raises(TransferError) as info:
                t.put(src, os.path.join(read_only, 'g'))
        message = str(info.value)
        assert info.value.errno == errno.EACCES and info.value.host == t.host
        assert "cannot create a file in %s: '%s/g'" % (read_only, read_only) in message
        assert '.chopsticks-' not in message and os.listdir(read_only) == []


CONTROLLER_HANGS_MID_PUT = r'''
import sys, time
from chopsticks import Local
src, dest, flag = sys.argv[1:]

def progress(done, total):
    if done >= 4 << 20:  # the host writes its temp file: stall here until killed
        open(flag, 'w').close()
        time.sleep(3600)

Local().put(src, dest, progress=progress)
'''


def test_a_controller_killed_mid_put_leaves_no_temp_file_on_the_host(big_file, tmp_path):
    """The controller's process ends in the middle of a put, before it could
    tell the host (killed, or a Ctrl-C ending the script between frames): the
    agent sees the hang-up and leaves at once, but removes the temp file
    first; the old file stays."""
    src, _, _ = big_file
    dest_dir = tmp_path / 'dest'
    dest_dir.mkdir()
    dest = dest_dir / 'dest'
    dest.write_bytes(b'precious')
    assert kill_controller_mid_write(tmp_path, CONTROLLER_HANGS_MID_PUT, [src, dest], dest_dir) == []
    assert dest.read_bytes() == b'precious'


# --- progress ----------------------------------------------------------------------------

def test_progress_callback_and_quiet_when_not_a_terminal(local, big_file, tmp_path, capfd):
    src, _, _ = big_file
    seen = []
    local.put(src, str(tmp_path / 'r'), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (BIG, BIG) and seen == sorted(seen) and len(seen) > 2
    seen.clear()
    local.fetch(str(tmp_path / 'r'), str(tmp_path / 'l'), progress=lambda d, t: seen.append(d))
    assert seen[-1] == BIG
    local.put(src, str(tmp_path / 'r'))  # stderr is not a terminal here: no bar
    assert capfd.readouterr().err == ''


# --- trees -------------------------------------------------------------------------------

def _make_tree(root):
    root.mkdir()
    (root / 'a.txt').write_bytes(b'alpha')
    (root / 'empty').write_bytes(b'')
    (root / 'sub' / 'deeper').mkdir(parents=True)
    (root / 'sub' / 'run.sh').write_bytes(b'#!/bin/sh\necho hi\n')
    os.chmod(str(root / 'sub' / 'run.sh'), 0o755)
    (root / 'sub' / 'deeper' / 'big.bin').write_bytes(os.urandom(3 << 20))
    (root / 'sub' / 'deeper' / 'private').write_bytes(b'secret')
    os.chmod(str(root / 'sub' / 'deeper' / 'private'), 0o600)
    (root / 'emptydir').mkdir()
    os.chmod(str(root / 'emptydir'), 0o700)
    os.symlink('sub/run.sh', str(root / 'link'))
    os.symlink('/nonexistent/target', str(root / 'dangling'))
    os.mkfifo(str(root / 'fifo'))
    return root


def _snapshot(root):
    """{rel: description} of a tree, FIFOs left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, str(root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ('link', os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ('dir', stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ('file', stat.S_IMODE(st.st_mode), sha256_of(path))
    return out


def test_put_and_fetch_a_tree(tunnel, tmp_path):
    tree = _make_tree(tmp_path / 'tree')
    expected = _snapshot(tree)
    result = tunnel.put(str(tree), str(tmp_path / 'copy'))
    assert result['remote_path'] == str(tmp_path / 'copy')
    assert result['skipped'] == ['fifo']
    assert sorted(result['files']) == ['a.txt', 'empty', 'sub/deeper/big.bin',
                                       'sub/deeper/private', 'sub/run.sh']
    assert sorted(result['links']) == ['dangling', 'link']
    assert _snapshot(tmp_path / 'copy') == expected

    # into an existing directory: like cp -r, under the source's name
    (tmp_path / 'into').mkdir()
    assert tunnel.put(str(tree), str(tmp_path / 'into'))['remote_path'] == str(tmp_path / 'into' / 'tree')
    assert _snapshot(tmp_path / 'into' / 'tree') == expected

    got = tunnel.fetch(str(tmp_path / 'copy'), str(tmp_path / 'back'))
    assert got['local_path'] == str(tmp_path / 'back') and got['skipped'] == []
    assert _snapshot(tmp_path / 'back') == expected
    assert leftovers(tmp_path / 'back') == []


def test_sync_sends_only_what_changed(tunnel, tmp_path):
    tree = _make_tree(tmp_path / 'tree')
    remote = tmp_path / 'mirror'
    first = tunnel.sync(str(tree), str(remote))
    assert first['created'] == ['a.txt', 'dangling', 'empty', 'emptydir/', 'link', 'sub/',
                                'sub/deeper/', 'sub/deeper/big.bin', 'sub/deeper/private',
                                'sub/run.sh']
    assert (first['updated'], first['deleted'], first['unchanged']) == ([], [], 0)
    assert _snapshot(remote) == _snapshot(tree)

    again = tunnel.sync(str(tree), str(remote))
    assert again == {'created': [], 'updated': [], 'deleted': [], 'unchanged': 7}

    before = os.stat(str(remote / 'sub' / 'deeper' / 'big.bin'))
    (tree / 'a.txt').write_bytes(b'ALPHA')                 # content
    os.chmod(str(tree / 'sub' / 'run.sh'), 0o700)            # mode only
    os.unlink(str(tree / 'link'))
    os.symlink('a.txt', str(tree / 'link'))                  # link target
    (tree / 'new.txt').write_bytes(b'new')                   # created
    os.unlink(str(tree / 'empty'))                           # extra on the remote
    (remote / 'junkdir' / 'inner').mkdir(parents=True)
    (remote / 'junkdir' / 'inner' / 'f').write_bytes(b'junk')

    expected = {'created': ['new.txt'], 'updated': ['a.txt', 'link', 'sub/run.sh'],
                'deleted': [], 'unchanged': 3}
    assert tunnel.sync(str(tree), str(remote), check=True) == expected
    assert (remote / 'a.txt').read_bytes() == b'alpha'   # check changed nothing
    assert tunnel.sync(str(tree), str(remote)) == expected
    assert (remote / 'a.txt').read_bytes() == b'ALPHA' and (remote / 'empty').exists()
    assert mode_of(str(remote / 'sub' / 'run.sh')) == 0o700
    assert os.stat(str(remote / 'sub' / 'deeper' / 'big.bin')).st_ino == before.st_ino  # untouched

    deleting = tunnel.sync(str(tree), str(remote), delete=True, check=True)
    assert deleting == {'created': [], 'updated': [], 'deleted': ['empty', 'junkdir/'],
                        'unchanged': 7}
    assert tunnel.sync(str(tree), str(remote), delete=True) == deleting
    assert _snapshot(remote) == _snapshot(tree)
    assert leftovers(remote) == []


def test_sync_refuses_to_replace_a_different_kind_without_delete(local, tmp_path):
    tree = tmp_path / 'tree'
    tree.mkdir()
    (tree / 'x').write_bytes(b'file here')
    remote = tmp_path / 'remote'
    (remote / 'x').mkdir(parents=True)
    with pytest.raises(TransferError) as info:
        local.sync(str(tree), str(remote))
    assert 'delete=True' in str(info.value) and 'x' in str(info.value)
    report = local.sync(str(tree), str(remote), delete=True)
    assert report['updated'] == ['x'] and (remote / 'x').read_bytes() == b'file here'


def test_fetching_a_fifo_is_refused_without_blocking(local, tmp_path):
    os.mkfifo(str(tmp_path / 'fifo'))
    with pytest.raises(TransferError) as info:
        local.fetch(str(tmp_path / 'fifo'), str(tmp_path / 'copy'))
    assert info.value.errno == errno.EINVAL and 'not a regular file' in str(info.value)


def test_asyncio_put_and_fetch(local, tmp_path):
    import asyncio
    src = tmp_path / 'src'
    src.write_bytes(b'async bytes')

    async def main():
        put = await local.aput(str(src), str(tmp_path / 'r'))
        got = await local.afetch(str(tmp_path / 'r'), str(tmp_path / 'l'))
        return put, got
    put, got = asyncio.run(main())
    assert put['size'] == got['size'] == 11 and (tmp_path / 'l').read_bytes() == b'async bytes'


def pipes_widen_here():
    """Whether this machine lets us give a pipe BULK_PIPE_SIZE bytes.  Not
    always: past the user's pipe-user-pages-soft, a process without
    CAP_SYS_RESOURCE gets EPERM (pipe(7)), and WidePipe leaves pipes be."""
    import fcntl
    from chopsticks import wire
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, wire.F_SETPIPE_SZ, wire.BULK_PIPE_SIZE)
        return True
    except OSError:
        return False
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize('kind', ['local', 'openssh'])
def test_pipes_are_wide_only_while_a_transfer_runs(sshd, kind, big_file, tmp_path):
    """Bulk transfers widen the tunnel's pipes (fewer system calls and wake-ups
    per MiB), and give the capacity back after: Linux counts it against a
    per-user limit past which every new pipe of that user shrinks."""
    import fcntl
    from chopsticks import wire
    from remote_helpers import agent_pipe_sizes
    with _tunnel(kind) as t:
        usual = t.call(agent_pipe_sizes)
        assert usual[0] < wire.BULK_PIPE_SIZE and usual[1] < wire.BULK_PIPE_SIZE
        if kind == 'openssh':  # (Local shares the pipe with us: we narrow it once we have sent)
            during = t.call_stream(agent_pipe_sizes, [b'x' * 1000])
            # stdin, for the stream; where pipes may not grow, it stays as it was
            assert during[0] == (wire.BULK_PIPE_SIZE if pipes_widen_here() else usual[0])

        t.put(big_file[0], str(tmp_path / 'copy'))
        t.fetch(str(tmp_path / 'copy'), str(tmp_path / 'back'))
        assert sha256_of(str(tmp_path / 'back')) == big_file[1]
        assert t.call(agent_pipe_sizes) == usual
        transport = t.connection().transport
        assert fcntl.fcntl(transport.stdin, wire.F_GETPIPE_SZ) == usual[0]
        assert fcntl.fcntl(transport.stdout.fileno(), wire.F_GETPIPE_SZ) == usual[1]
        assert wire.WidePipe.widened == 0


def test_wide_pipe_is_bounded_and_restored(monkeypatch):
    import fcntl
    from chopsticks import wire
    wide = wire.BULK_PIPE_SIZE if pipes_widen_here() else None
    r, w = os.pipe()
    try:
        usual = fcntl.fcntl(w, wire.F_GETPIPE_SZ)
        wide = wide or usual  # where pipes may not grow, WidePipe changes nothing
        with wire.WidePipe(w):
            assert fcntl.fcntl(r, wire.F_GETPIPE_SZ) == wide
            with wire.WidePipe(r):  # already wide: the outer one restores it
                pass
            assert fcntl.fcntl(r, wire.F_GETPIPE_SZ) == wide
        assert fcntl.fcntl(r, wire.F_GETPIPE_SZ) == usual
        monkeypatch.setattr(wire, 'BULK_PIPES_MAX', 0)
        with wire.WidePipe(w):
            assert fcntl.fcntl(w, wire.F_GETPIPE_SZ) == usual
        assert wire.WidePipe.widened == 0
    finally:
        os.close(r)
        os.close(w)


def test_a_wide_pipe_closed_meanwhile_is_not_restored_on_another():
    """A tunnel closed during a transfer closes its pipe under WidePipe; the
    restore must not resize the next pipe that gets the same fd number."""
    import fcntl
    from chopsticks import wire
    if not pipes_widen_here():
        pytest.skip('pipes cannot be resized here (pipe-user-pages-soft)')
    r, w = os.pipe()
    with wire.WidePipe(w):
        os.close(r)
        os.close(w)
        r2, w2 = os.pipe()
        if w2 != w:  # the next pipe gets the closed one's number
            os.dup2(w2, w)
            os.close(w2)
        fcntl.fcntl(w, wire.F_SETPIPE_SZ, wire.BULK_PIPE_SIZE)
    try:
        assert fcntl.fcntl(w, wire.F_GETPIPE_SZ) == wire.BULK_PIPE_SIZE
        assert wire.WidePipe.widened == 0
    finally:
        os.close(r2)
        os.close(w)


def test_the_first_put_sends_the_host_only_what_it_needs(tmp_path, monkeypatch):
    """chopsticks.files on the host imports the chopsticks package: that must
    not bring the controller's core along (it cost 150 ms before a first put)."""
    import sys
    others = [p for p in available_pythons()
              if os.path.realpath(p) != os.path.realpath(sys.executable)]
    if not others:
        pytest.skip('no Python here but the one chopsticks is installed in')
    src = tmp_path / 'src'
    src.write_bytes(b'x')
    monkeypatch.chdir(tmp_path)  # python -c would find chopsticks in this checkout
    with Local(python=others[-1]) as t:
        t.put(str(src), str(tmp_path / 'copy'))
        sent = t.connection().modules.sent
    assert {'chopsticks', 'chopsticks.errors'} <= sent  # (files itself: read from this checkout)
    assert not sent & {'chopsticks.tunnel', 'chopsticks.connection', 'chopsticks.group'}

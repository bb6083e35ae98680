"""The host's half of file transfer: what ``put``, ``fetch`` and ``sync`` run there.

This module is served to hosts by the import hook (the controller calls
``files_remote.remote_receive`` and friends by reference), so it is
stdlib-only, imports nothing from chopsticks and runs on Python 3.6: type
hints are comments.  The controller uses its tree helpers too (``walk``,
``TreeWriter``), so both ends write trees the same way.

A tree is always worked on relative to directory file descriptors opened
with O_NOFOLLOW: a symlink planted anywhere inside a destination (by a user
who owns part of it, while a root transfer runs) is refused, never followed,
whether it was there when the transfer was planned or swapped in meanwhile.
The root of a tree is never a symlink either.
"""
import errno
import hashlib
import os
import queue
import stat
import sys
import tempfile
import threading

MYPY = False
if MYPY:  # type comments only: importing typing costs a Python 3.6 host ~10 ms
    from typing import Optional, Tuple  # noqa: F401

CHUNK = 1 << 20             # bytes per piece sent to the host (one DATA frame)
FETCH_CHUNK = 256 << 10     # bytes per item from the host: 64 items in flight = 16 MiB
FLUSH_EVERY = 16 << 20      # fdatasync in the background this often (see Flusher)
READ_AHEAD = 4              # pieces a reading thread prepares ahead of the sender
TEMP_MARK = '.chopsticks-'

# One digest, SHA-1, checks every file end to end, is returned as ``sha1sum``
# (as chopsticks 1.x did; Ansible's ``checksum`` is SHA-1 too) and compares
# trees for sync.  It guards against corruption, not against the host, which
# could report any digest it liked; and every pass over the bytes counts, since
# a transfer is bound by the CPU of the four processes it runs through.
digest = hashlib.sha1
DIGEST_SIZE = digest().digest_size

NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)
DIRECTORY = getattr(os, 'O_DIRECTORY', 0)
CLOEXEC = getattr(os, 'O_CLOEXEC', 0)
DIR_FLAGS = os.O_RDONLY | DIRECTORY | NOFOLLOW | CLOEXEC


# ======================================================================================
# Directories by descriptor
# ======================================================================================

def open_root(path, create=False, follow=False):
    # type: (str, bool, bool) -> int
    """A descriptor of directory ``path``, created (with its parents) when
    ``create``.  Unless ``follow``, ``path`` itself must not be a symlink:
    a destination root planted as a link to another directory is refused."""
    if create:
        try:
            os.makedirs(path)
        except FileExistsError:
            pass
    try:
        return os.open(path, DIR_FLAGS & ~(0 if not follow else NOFOLLOW))
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and not follow and os.path.islink(path):
            raise OSError(errno.ELOOP, 'is a symlink; refusing to work through it', path)
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            raise NotADirectoryError(errno.ENOTDIR, 'exists and is not a directory', path)
        raise


def open_dir_at(dir_fd, name, where):
    # type: (int, str, str) -> int
    """Open subdirectory ``name`` of ``dir_fd``, refusing a symlink (``where``
    is its path, for the message)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                is_link = False
            if is_link:
                raise OSError(errno.ELOOP, 'is a symlink; refusing to work through it', where)
            raise NotADirectoryError(errno.ENOTDIR, 'exists and is not a directory', where)
        raise


class Dirs(object):
    """The directories of one tree, opened on demand below its root descriptor.

    Each component is opened with O_NOFOLLOW relative to its parent, so no
    path under the root resolves through a symlink.  A few descriptors stay
    cached (files come grouped by directory); callers needing one beyond the
    next lookup ``os.dup`` it.
    """

    CACHED = 16

    def __init__(self, root_fd, root_path):
        # type: (int, str) -> None
        self.root_fd = root_fd
        self.root_path = root_path
        self.cache = {}  # type: dict  # rel dir -> fd

    def fd(self, rel_dir):
        # type: (str) -> int
        if not rel_dir:
            return self.root_fd
        fd = self.cache.get(rel_dir)
        if fd is None:
            parent, _, name = rel_dir.rpartition('/')
            fd = open_dir_at(self.fd(parent), name, self.path(rel_dir))
            if len(self.cache) >= self.CACHED:
                os.close(self.cache.pop(next(iter(self.cache))))
            self.cache[rel_dir] = fd
        return fd

    def parent(self, rel):
        # type: (str) -> tuple
        """(descriptor of rel's directory, rel's last component)."""
        rel_dir, _, name = rel.rpartition('/')
        return self.fd(rel_dir), name

    def path(self, rel):
        # type: (str) -> str
        return os.path.join(self.root_path, rel) if rel else self.root_path

    def close(self):
        # type: () -> None
        cache, self.cache = self.cache, {}
        for fd in cache.values():
            os.close(fd)
        os.close(self.root_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def walk(dirs, ids=None):
    # type: (Dirs, Optional[dict]) -> tuple
    """(dirs, files, links, skipped) under ``dirs``' root, sorted, parents first.

    dirs: [(rel, mode)], files: [(rel, size, mode)], links: [(rel, target)],
    skipped: [rel].  Symlinks are never followed.  ``ids``, when given,
    receives rel -> (st_dev, st_ino) of every file, for open_file's check.
    """
    found_dirs, files, links, skipped = [], [], [], []
    pending = ['']
    while pending:
        rel_dir = pending.pop()
        fd = dirs.fd(rel_dir)
        subdirs = []
        for name in sorted(os.listdir(fd)):
            rel = rel_dir + '/' + name if rel_dir else name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we looked
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFREG:
                files.append((rel, st.st_size, stat.S_IMODE(st.st_mode)))
                if ids is not None:
                    ids[rel] = (st.st_dev, st.st_ino)
            elif kind == stat.S_IFDIR:
                found_dirs.append((rel, stat.S_IMODE(st.st_mode)))
                subdirs.append(rel)
            elif kind == stat.S_IFLNK:
                links.append((rel, os.readlink(name, dir_fd=fd)))
            else:
                skipped.append(rel)
        pending.extend(reversed(subdirs))
    return found_dirs, files, links, skipped


def open_file(dirs, rel, expected=None):
    # type: (Dirs, str, Optional[Tuple[int, int]]) -> int
    """Open regular file ``rel`` for reading, never through a symlink, and
    (given ``expected`` (st_dev, st_ino) from walk) only if it is the file the
    walk saw: a file swapped after the walk is refused, not read."""
    fd_dir, name = dirs.parent(rel)
    try:
        fd = os.open(name, os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK | CLOEXEC, dir_fd=fd_dir)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, 'became a symlink while the transfer ran; refusing '
                          'to read through it', dirs.path(rel))
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, 'no longer a regular file', dirs.path(rel))
        if expected is not None and (st.st_dev, st.st_ino) != tuple(expected):
            raise OSError(errno.ESTALE, 'was replaced by another file while the transfer '
                          'ran; refusing to send it', dirs.path(rel))
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def digest_fd(fd):
    # type: (int) -> str
    h = digest()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            break
        h.update(view[:n])
    return h.hexdigest()


# ======================================================================================
# Writing files safely
# ======================================================================================

_host_tags = {}  # type: dict


def _host_tag():
    """Six hex digits naming this machine, for temp file names (cached per process)."""
    tag = _host_tags.get(os.getpid())
    if tag is None:
        import socket
        name = socket.gethostname().encode('utf-8', 'replace')
        tag = _host_tags[os.getpid()] = hashlib.sha1(name).hexdigest()[:6]
    return tag


# What a temp name adds to the target's name: '.', TEMP_MARK, the host tag, a
# process id (up to 7 digits) and 8 hex digits, 36 bytes; the rest of
# NAME_MAX (255 bytes on every filesystem we write to) is the target's name.
# The file tasks (chopsticks_files.tasks) name their temp files the same way
# and sweep them alike, with their own copy of these few lines: each module
# is shipped to hosts on its own, standard library only.
TEMP_NAME_ROOM = 200


def fit_name(name, limit=TEMP_NAME_ROOM):
    # type: (str, int) -> str
    """The longest start of ``name`` that takes at most ``limit`` bytes on
    disk: a temp name made from it fits NAME_MAX whatever the encoding (80 CJK
    characters are 240 bytes).  Cut between characters, so that the temp name
    is as valid as ``name``; an undecodable byte (a surrogate escape) is one."""
    cut = name[:limit]
    while len(os.fsencode(cut)) > limit:
        cut = cut[:-1]
    return cut


def _temp_prefix(name):
    return '.%s%s' % (fit_name(name), TEMP_MARK)


def temp_file(dir_fd, name, sweep=False, where=None):
    # type: (int, str, bool, Optional[str]) -> tuple
    """Create a new hidden temp file for ``name`` in ``dir_fd``: (fd, temp name).

    Its name carries this host's tag and process id, so that with ``sweep``
    the temp files a killed process left for the same target are removed.
    ``where`` is the target's path, for errors (a directory this user may
    not write is named with the target, not with the temp file) and for the
    agent, which removes the temp file if it must exit before it is renamed.
    """
    prefix = _temp_prefix(name)
    tag = '%s-%d-' % (_host_tag(), os.getpid())
    if sweep:
        _sweep_temps(dir_fd, prefix, tag)
    while True:
        temp = prefix + tag + os.urandom(4).hex()
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o600,
                         dir_fd=dir_fd)
        except FileExistsError:
            continue
        except OSError as e:
            if where is None:
                raise
            raise type(e)(e.errno, '%s: cannot create a file in %s'
                          % (e.strerror, os.path.dirname(where) or '.'), where)
        if where is not None:
            writing(temp, os.path.join(os.path.dirname(where), temp))
        return fd, temp


def _agent_temp_files():
    # type: () -> Optional[dict]
    """The running agent's registry of temp files being written (agent.temp_files), if any."""
    return getattr(sys.modules.get('_chopsticks_agent'), 'temp_files', None)


def writing(temp, path):
    # type: (str, str) -> None
    """Tell the agent that temp file ``temp`` (its base name, unique) is being
    written at ``path``: an agent leaving at once (the controller hung up)
    removes it, since its own cleanup will not run.  See ``written``."""
    temp_files = _agent_temp_files()
    if temp_files is not None:
        temp_files[temp] = path


def written(temp):
    # type: (str) -> None
    """Temp file ``temp`` was renamed into place or removed."""
    temp_files = _agent_temp_files()
    if temp_files is not None:
        temp_files.pop(temp, None)


def _sweep_temps(dir_fd, prefix, own_tag):
    host = own_tag.split('-')[0]
    try:
        names = [n for n in os.listdir(dir_fd) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        parts = name[len(prefix):].split('-')
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass
        except OSError:
            pass  # alive (EPERM: another user's process)


def write_all(fd, view):
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Flusher(object):
    """Flushes a file being written to disk in the background, every
    FLUSH_EVERY bytes, so that the fsync before its rename finds little left.

    On virtual disks the flush itself (the host writing its cache out) is the
    slow part, so merely starting writeback early is not enough: 256 MiB
    written at 200 MB/s then fsync'd waited ~0.3 s here; with this, ~0.02 s.
    """

    def __init__(self, fd, enabled=True):
        self.fd = fd
        self.enabled = enabled
        self.unflushed = 0
        self.thread = None
        self.cond = threading.Condition(threading.Lock())
        self.wanted = False
        self.stopping = False

    def wrote(self, n):
        if not self.enabled:
            return
        self.unflushed += n
        if self.unflushed < FLUSH_EVERY:
            return
        self.unflushed = 0
        with self.cond:
            self.wanted = True
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name='chopsticks-flush')
                self.thread.daemon = True
                self.thread.start()
            self.cond.notify()

    def _run(self):
        sync = getattr(os, 'fdatasync', os.fsync)
        while True:
            with self.cond:
                while not (self.wanted or self.stopping):
                    self.cond.wait()
                if self.stopping:
                    return
                self.wanted = False
            try:
                sync(self.fd)
            except OSError:
                return  # the final fsync reports it

    def stop(self):
        """Wait for the flushing thread: call before the descriptor is closed."""
        if self.thread is not None:
            with self.cond:
                self.stopping = True
                self.cond.notify()
            self.thread.join()
            self.thread = None


def discard(fd, dir_fd, temp):
    """Close ``fd`` (if any) and remove ``temp`` from ``dir_fd``, ignoring errors."""
    written(temp)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(temp, dir_fd=dir_fd)
    except OSError:
        pass


class Batch(object):
    """Written temp files waiting to be made durable and renamed into place.

    One fsync usually commits the filesystem journal for every file written
    before it, so a tree of small files costs a few slow fsyncs, not one per
    file.  Each file is renamed only after its own fsync.  Each pending file
    holds its own descriptor of its directory, so the rename lands where the
    file was written whatever became of the path meanwhile.
    """

    MAX_FILES = 128       # files held at once (two descriptors each)
    MAX_BYTES = 64 << 20

    def __init__(self, durable=True):
        self.durable = durable
        self.pending = []  # (fd, dir_fd, temp, name)
        self.size = 0

    def add(self, fd, dir_fd, temp, name, mode, size):
        """Take charge of ``fd`` and ``temp`` in ``dir_fd`` (removed if anything fails)."""
        try:
            own_dir = os.dup(dir_fd)
        except BaseException:
            discard(fd, dir_fd, temp)
            raise
        self.pending.append((fd, own_dir, temp, name))
        self.size += size
        os.fchmod(fd, mode)
        if len(self.pending) >= self.MAX_FILES or self.size >= self.MAX_BYTES:
            self.commit()

    def commit(self):
        pending, self.pending = self.pending, []
        self.size = 0
        renamed = []  # directory descriptors, fsync'd once all renames are done
        try:
            if self.durable:
                for fd, _, _, _ in pending:
                    os.fsync(fd)
            while pending:
                fd, dir_fd, temp, name = pending[-1]
                os.close(fd)
                pending[-1] = (None, dir_fd, temp, name)
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                written(temp)
                renamed.append(pending.pop()[1])
            if self.durable:
                synced = set()
                for dir_fd in renamed:
                    key = os.fstat(dir_fd)[1:3]  # (st_ino, st_dev)
                    if key not in synced:
                        synced.add(key)
                        try:
                            os.fsync(dir_fd)
                        except OSError:
                            pass
        except BaseException:
            self.pending = pending
            self.discard()
            raise
        finally:
            for dir_fd in renamed:
                os.close(dir_fd)

    def discard(self):
        pending, self.pending = self.pending, []
        for fd, dir_fd, temp, _ in pending:
            discard(fd, dir_fd, temp)
            os.close(dir_fd)


class TreeWriter(object):
    """Creates directories, files and symlinks below one root, by descriptor."""

    def __init__(self, dirs, durable=True):
        # type: (Dirs, bool) -> None
        self.dirs = dirs
        self.batch = Batch(durable)
        self.durable = durable

    def make_dir(self, rel, mode):
        # type: (str, int) -> None
        """Create directory ``rel`` (or accept an existing real one) with ``mode``."""
        if not rel:
            fd = self.dirs.root_fd
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
                os.fchmod(fd, mode)
            return
        parent, name = self.dirs.parent(rel)
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        fd = self.dirs.fd(rel)  # refuses a symlink or a file
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)

    def open_temp(self, rel, sweep=False):
        # type: (str, bool) -> tuple
        """(fd, dir_fd, temp name, name) for a new file to become ``rel``."""
        parent, name = self.dirs.parent(rel)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, 'is a directory, cannot replace it '
                                    'with a file', self.dirs.path(rel))
        fd, temp = temp_file(parent, name, sweep, self.dirs.path(rel))
        return fd, parent, temp, name

    def add(self, fd, dir_fd, temp, name, mode, size):
        self.batch.add(fd, dir_fd, temp, name, mode, size)

    def link(self, rel, target_text):
        # type: (str, str) -> None
        """Make ``rel`` a symlink to ``target_text``, atomically replacing a file or link."""
        parent, name = self.dirs.parent(rel)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=parent) == target_text:
                return
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, 'a directory is in the way of a symlink',
                                        self.dirs.path(rel))
        temp = _temp_prefix(name) + os.urandom(4).hex()
        os.symlink(target_text, temp, dir_fd=parent)
        try:
            os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            discard(None, parent, temp)
            raise

    def commit(self):
        self.batch.commit()

    def discard(self):
        self.batch.discard()


# ======================================================================================
# What runs on the host
# ======================================================================================

def remote_path(path):
    # type: (str) -> str
    """``path`` as the host sees it: ``~`` expanded, relative to the home directory."""
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(os.path.expanduser('~'), path)
    return path


class _Incoming(object):
    """Reads exact byte counts from the chunks of an input stream without copying."""

    def __init__(self, chunks):
        # The agent's stream hands out chunks as they arrived (next_buffer),
        # without the copy into bytes that iterating it makes.
        self.chunks = iter(chunks)
        self.next_chunk = getattr(chunks, 'next_buffer', None) or self.chunks.__next__
        self.view = memoryview(b'')

    def piece(self, limit):
        """Up to ``limit`` bytes (a memoryview); raises EOFError at the end."""
        view = self.view
        if not view:
            try:
                view = memoryview(self.next_chunk()).cast('B')
            except StopIteration:
                raise EOFError('the transfer ended early')
        if len(view) > limit:
            self.view = view[limit:]
            return view[:limit]
        self.view = memoryview(b'')
        return view

    def exact(self, n):
        parts = []
        while n:
            piece = self.piece(n)
            parts.append(bytes(piece))
            n -= len(piece)
        return b''.join(parts)

    def finish(self):
        """Consume the end of the stream (raises if the controller aborted)."""
        if self.view:
            raise IOError('%d unexpected bytes at the end of the transfer' % len(self.view))
        for chunk in self.chunks:
            if len(chunk):
                raise IOError('unexpected bytes at the end of the transfer')


def _receive_file(incoming, fd, target, size, durable=True):
    """Write ``size`` bytes from ``incoming`` to ``fd`` and check the digest
    that follows them; returns the hex digest."""
    flusher = Flusher(fd, durable)
    try:
        hashed = digest()
        remaining = size
        written = 0
        while remaining:
            piece = incoming.piece(remaining)
            hashed.update(piece)
            try:
                write_all(fd, piece)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise type(e)(e.errno, '%s after writing %d of %d bytes of %s'
                                  % (os.strerror(e.errno), written, size, target))
                raise
            remaining -= len(piece)
            written += len(piece)
            flusher.wrote(len(piece))
        expected = incoming.exact(DIGEST_SIZE)
        if hashed.digest() != expected:
            raise IOError('checksum mismatch writing %s: the controller sent sha1 %s, '
                          'this host received %s; %s was not changed'
                          % (target, expected.hex(), hashed.hexdigest(), target))
    finally:
        flusher.stop()
    return hashed.hexdigest()


class _Unchanged(object):
    """``contextlib.nullcontext()``, which Python 3.6 hosts lack."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


def _wide_agent_pipe(direction):
    """On the host: the agent's pipe, widened while a transfer runs through it
    (streams into the host have it widened by the agent itself)."""
    agent = getattr(sys.modules.get('_chopsticks_agent'), 'agent', None)
    return agent.wide_pipe(direction) if agent is not None else _Unchanged()


def remote_receive(stream, dest, spec):
    # type: (object, str, dict) -> dict
    """Receive what ``put`` sends; runs on the host.

    ``spec``: kind ('file' or 'tree'), name (the source's base name), files
    [(rel, size, mode)], dirs [(rel, mode)], links [(rel, target)], contents
    (True: ``dest`` itself is the root of the tree, as for sync), durable.
    The stream carries, for each file in order, its bytes then their SHA-1.
    """
    incoming = _Incoming(stream)
    durable = spec.get('durable', True)
    if spec['kind'] == 'file':
        return _receive_one(incoming, dest, spec, durable)
    if dest is None:
        root = tempfile.mkdtemp(prefix='chopsticks-')
    else:
        root = remote_path(dest)
        if not spec.get('contents') and os.path.isdir(root):
            root = os.path.join(root, spec['name'])  # like cp -r: into an existing directory
    total = 0
    with Dirs(open_root(root, create=True), root) as dirs:
        tree = TreeWriter(dirs, durable)
        if spec.get('mode') is not None:
            tree.make_dir('', spec['mode'])
        for rel, mode in spec['dirs']:
            tree.make_dir(rel, mode)
        try:
            for rel, size, mode in spec['files']:
                fd, dir_fd, temp, name = tree.open_temp(rel)
                try:
                    _receive_file(incoming, fd, dirs.path(rel), size, durable)
                except BaseException:
                    discard(fd, dir_fd, temp)
                    raise
                tree.add(fd, dir_fd, temp, name, mode, size)
                total += size
            incoming.finish()
            tree.commit()
        except BaseException:
            tree.discard()
            raise
        for rel, target_text in spec['links']:
            tree.link(rel, target_text)
    return {'remote_path': root, 'size': total, 'files': [f[0] for f in spec['files']],
            'dirs': [d[0] for d in spec['dirs']], 'links': [l[0] for l in spec['links']],
            'skipped': spec.get('skipped', [])}


def _receive_one(incoming, dest, spec, durable):
    rel, size, mode = spec['files'][0]
    if dest is None:
        fd, target = tempfile.mkstemp(prefix='chopsticks-', suffix='-' + spec['name'])
        os.close(fd)
    else:
        target = remote_path(dest)
        if os.path.isdir(target):
            target = os.path.join(target, spec['name'])
        elif dest.endswith('/'):
            raise NotADirectoryError(errno.ENOTDIR, 'no such directory', target)
    parent, name = os.path.split(target)
    try:
        # the user named this directory: it may be a link (/tmp -> /private/tmp)
        parent_fd = open_root(parent, follow=True)
    except (FileNotFoundError, NotADirectoryError):
        if dest is None:
            discard(None, None, target)
        raise FileNotFoundError(errno.ENOENT, 'the directory %s does not exist' % parent,
                                target)
    with Dirs(parent_fd, parent) as dirs:
        tree = TreeWriter(dirs, durable)
        try:
            fd, dir_fd, temp, name = tree.open_temp(name, sweep=True)
            try:
                sha1 = _receive_file(incoming, fd, target, size, durable)
            except BaseException:
                discard(fd, dir_fd, temp)
                raise
            tree.add(fd, dir_fd, temp, name, mode, size)
            incoming.finish()
            tree.commit()
        except BaseException:
            tree.discard()
            if dest is None:
                discard(None, None, target)
            raise
    return {'remote_path': target, 'size': size, 'sha1sum': sha1, 'mode': mode}


def send_file(fd, chunk):
    """Generator: the chunks of an open file, then a trailer dict (size, sha1sum).

    A helper thread reads and hashes up to READ_AHEAD chunks ahead, so the
    pipe to the controller does not wait for the hashes.  The caller closes
    ``fd`` only after this generator is finished or closed (the thread is
    joined by then).
    """
    items = queue.Queue(READ_AHEAD)
    stop = threading.Event()
    reader = threading.Thread(target=_read_and_hash, args=(fd, chunk, items, stop),
                              name='chopsticks-read')
    reader.daemon = True
    reader.start()
    try:
        while True:
            item = items.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, dict):
                return
    finally:
        stop.set()
        while reader.is_alive():  # it may be blocked on a full queue
            try:
                items.get(timeout=0.05)
            except queue.Empty:
                pass
        reader.join()


def _read_and_hash(fd, chunk, items, stop):
    try:
        hashed = digest()
        size = 0
        while not stop.is_set():
            data = os.read(fd, chunk)
            if not data:
                items.put({'size': size, 'sha1sum': hashed.hexdigest()})
                return
            hashed.update(data)
            size += len(data)
            items.put(data)
    except BaseException as e:
        items.put(e)


def remote_send(path, chunk=FETCH_CHUNK):
    # type: (str, int) -> object
    """What ``fetch`` receives; a generator that runs on the host.

    A file: a header dict (kind='file', path, size, mode), its bytes in
    chunks, then a trailer dict (size, sha1sum).  A directory: a header
    dict (kind='tree', path, mode, dirs, files, links, skipped), then for each
    file of ``files`` in order its chunks and a trailer.
    """
    with _wide_agent_pipe('send'):
        yield from _send(path, chunk)


def _send(path, chunk):
    path = remote_path(path)
    # Without blocking on a FIFO or a device; a link named as the source is followed.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        try:
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, 'not a regular file or a directory', path)
            os.set_blocking(fd, True)
            yield {'kind': 'file', 'path': path, 'size': st.st_size,
                   'mode': stat.S_IMODE(st.st_mode)}
            for item in send_file(fd, chunk):
                yield item
        finally:
            os.close(fd)
        return
    with Dirs(fd, path) as dirs:
        ids = {}  # type: dict
        found_dirs, files, links, skipped = walk(dirs, ids)
        yield {'kind': 'tree', 'path': path, 'mode': stat.S_IMODE(st.st_mode),
               'dirs': found_dirs, 'files': files, 'links': links, 'skipped': skipped}
        for rel, size, mode in files:
            fd = open_file(dirs, rel, ids[rel])
            try:
                for item in send_file(fd, chunk):
                    yield item
            finally:
                os.close(fd)


def remote_tree_state(path, sizes):
    # type: (str, dict) -> object
    """The host's side of ``sync``: what is under ``path``.

    Returns None if ``path`` does not exist, else {'path', 'entries'}:
    entries maps rel -> ('d', mode), ('l', target), ('o',) for anything
    else, or ('f', size, mode, sha1) where sha1 is computed only when
    ``sizes`` (rel -> size of the controller's file) says the sizes are
    equal, else None.  A symlinked ``path`` is refused.
    """
    path = remote_path(path)
    try:
        root_fd = open_root(path)
    except FileNotFoundError:
        return None
    with Dirs(root_fd, path) as dirs:
        ids = {}  # type: dict
        found_dirs, files, links, skipped = walk(dirs, ids)
        state = {}  # type: dict
        for rel, mode in found_dirs:
            state[rel] = ('d', mode)
        for rel, target in links:
            state[rel] = ('l', target)
        for rel in skipped:
            state[rel] = ('o',)
        for rel, size, mode in files:
            sha1 = None
            if sizes.get(rel) == size:
                fd = open_file(dirs, rel, ids[rel])
                try:
                    sha1 = digest_fd(fd)
                finally:
                    os.close(fd)
            state[rel] = ('f', size, mode, sha1)
    return {'path': path, 'entries': state}


def _remove_at(dir_fd, name, where):
    """Remove ``name`` from ``dir_fd``: a file, a link, or a whole directory
    (its contents removed by descriptor too, never through a link)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = open_dir_at(dir_fd, name, where)
    try:
        for child in os.listdir(fd):
            _remove_at(fd, child, os.path.join(where, child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def remote_delete(root, rels):
    # type: (str, list) -> int
    """Remove ``rels`` (files, links, or whole directories) under ``root``."""
    root = remote_path(root)
    with Dirs(open_root(root), root) as dirs:
        for rel in rels:
            parent, name = dirs.parent(rel)
            _remove_at(parent, name, dirs.path(rel))
    return len(rels)


def remote_chmod(root, modes):
    # type: (str, list) -> None
    """Set the mode of each (rel, mode) under ``root``, never through a link."""
    root = remote_path(root)
    with Dirs(open_root(root), root) as dirs:
        for rel, mode in modes:
            parent, name = dirs.parent(rel)
            _chmod_at(parent, name, mode, dirs.path(rel))


def _chmod_at(dir_fd, name, mode, where):
    try:
        fd = os.open(name, os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK | CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, 'is a symlink; refusing to change its mode', where)
        if e.errno not in (errno.EACCES, errno.EPERM):
            raise
        # An unreadable file of our own: O_PATH opens it without reading rights.
        fd = os.open(name, getattr(os, 'O_PATH', os.O_RDONLY) | NOFOLLOW | CLOEXEC,
                     dir_fd=dir_fd)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.ELOOP, 'is a symlink; refusing to change its mode', where)
            os.chmod('/proc/self/fd/%d' % fd, mode)
        finally:
            os.close(fd)
        return
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)

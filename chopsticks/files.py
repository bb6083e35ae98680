"""Copying files and directory trees to and from a host: put, fetch, sync.

Controller side::

    tunnel.put('app.tar.gz', '/srv/app.tar.gz', mode=0o640)
    tunnel.fetch('/var/log/syslog', 'logs/')          # -> logs/syslog
    tunnel.put('site/', '/srv/www')                     # a tree, like ``cp -r``
    tunnel.sync('site/', '/srv/www', delete=True)       # only what changed

What a caller may rely on:

* Bytes stream in constant memory in both directions (a file larger than RAM
  works), hashed with SHA-1 on both sides while they travel.  Each file is
  written to a hidden temporary name in its destination directory
  (``.name.chopsticks-<host>-<pid>-XXXXXXXX``), fsync'd (flushed in the
  background as it grows, so the last fsync is short), and renamed into
  place only once both hashes agree.  Whatever goes wrong (checksum
  mismatch, the connection or the remote dies, disk full, a local read
  error, Ctrl-C) the old destination is left as it was and the temporary
  file is removed; only a process killed outright cannot remove its own, and
  the next transfer to the same file on that host removes it.  A tree is not
  atomic as a whole: files already renamed into place stay.
* Remote paths are expanded on the host: ``~`` is the remote home and a
  relative path is relative to it.  A destination that is an existing
  directory receives the source inside it under its own name (``cp``, ``scp``).
* Modes: ``put`` sets ``mode`` (default 0o644; ``mode=None`` keeps the local
  file's mode); ``fetch`` keeps the remote file's permission bits (without
  setuid/setgid/sticky) unless ``mode`` is given.  In trees every file and
  directory keeps its own mode.  Owners and times are not copied.
* Trees: symbolic links are copied as symbolic links with the same target
  text (not followed; a link given as the source itself is followed, like
  ``cp``).  Sockets, FIFOs and device files are skipped and listed under
  ``'skipped'``.  Paths a remote sends for a tree are checked before anything
  is written: no absolute paths, no ``..``, never written through a symlink.
* Failures raise :class:`TransferError` (an ``OSError`` with ``errno`` when the
  cause had one) whose message names the host, the operation and the path;
  a connection lost mid-transfer raises ``TunnelClosed`` saying what was
  interrupted.
* ``progress``: ``None`` (default) shows a ``rich`` progress bar on a terminal
  stderr for transfers over 8 MiB when rich is installed; ``False`` never,
  ``True`` whenever rich is installed; a callable is called as
  ``progress(bytes_done, bytes_total)`` instead.

The functions whose names start with ``remote_`` run on the host: this module
is served to it by the import hook, so everything at module level is stdlib
(plus the pure ``chopsticks.errors``) and the remote parts run on Python 3.6.
"""
import errno
import hashlib
import os
import queue
import re
import shutil
import stat
import sys
import tempfile
import threading

from chopsticks.errors import ChopsticksError, RemoteException, TunnelClosed

__all__ = ['put', 'fetch', 'sync', 'TransferError']

CHUNK = 1 << 20             # bytes per piece sent to the host (one DATA frame)
FETCH_CHUNK = 256 << 10     # bytes per item from the host: 64 items in flight = 16 MiB
FLUSH_EVERY = 16 << 20      # fdatasync in the background this often (see _Flusher)
READ_AHEAD = 4              # pieces a reading thread prepares ahead of the sender
PROGRESS_THRESHOLD = 8 << 20  # smaller transfers never show a bar by themselves
TEMP_MARK = '.chopsticks-'

# One digest, SHA-1, checks every file end to end, is returned as ``sha1sum``
# (as chopsticks 1.x did; Ansible's ``checksum`` is SHA-1 too) and compares
# trees for sync.  It guards against corruption, not against the host, which
# could report any digest it liked; and every pass over the bytes counts, since
# a transfer is bound by the CPU of the four processes it runs through.
_digest = hashlib.sha1
DIGEST_SIZE = _digest().digest_size


class TransferError(ChopsticksError, OSError):
    """A put, fetch or sync failed.  The destination was left unchanged
    (for a tree: files already completed stay).

    ``host``, ``operation`` (``'put'``, ``'fetch'``, ``'sync'``), ``errno``
    (None when the cause was not an OSError) and ``remote_traceback`` (when
    the remote side failed) are attributes; the message says all of it.
    """

    def __init__(self, message, host=None, operation=None, errno=None, remote_traceback=''):
        super().__init__(message)
        self.host = host
        self.operation = operation
        self.errno = errno
        self.remote_traceback = remote_traceback

    def __str__(self):
        return self.args[0]


# ======================================================================================
# Both sides: walking trees, writing files safely
# ======================================================================================

def _walk(root):
    """(dirs, files, links, skipped) under ``root``, sorted, parents first.

    dirs: [(rel, mode)], files: [(rel, size, mode)], links: [(rel, target)],
    skipped: [rel].  Symlinks are never followed.
    """
    dirs, files, links, skipped = [], [], [], []
    pending = ['']
    while pending:
        rel_dir = pending.pop()
        path = os.path.join(root, rel_dir) if rel_dir else root
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            rel = rel_dir + '/' + entry.name if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFREG:
                files.append((rel, st.st_size, stat.S_IMODE(st.st_mode)))
            elif kind == stat.S_IFDIR:
                dirs.append((rel, stat.S_IMODE(st.st_mode)))
                subdirs.append(rel)
            elif kind == stat.S_IFLNK:
                links.append((rel, os.readlink(entry.path)))
            else:
                skipped.append(rel)
        pending.extend(reversed(subdirs))
    return dirs, files, links, skipped


_host_tags = {}


def _host_tag():
    """Six hex digits naming this machine, for temp file names (cached per process)."""
    tag = _host_tags.get(os.getpid())
    if tag is None:
        import socket
        name = socket.gethostname().encode('utf-8', 'replace')
        tag = _host_tags[os.getpid()] = hashlib.sha1(name).hexdigest()[:6]
    return tag


def _temp_prefix(name):
    return '.%s%s' % (name[:150], TEMP_MARK)


def _temp_file(target, sweep=False):
    """Open a new hidden temp file next to ``target``: (fd, path).

    Its name carries this host's tag and process id, so that with ``sweep``
    the temp files a killed process left for the same target are removed.
    """
    directory, name = os.path.split(target)
    directory = directory or '.'
    prefix = _temp_prefix(name)
    tag = '%s-%d-' % (_host_tag(), os.getpid())
    if sweep:
        _sweep_temps(directory, prefix, tag)
    return tempfile.mkstemp(prefix=prefix + tag, dir=directory)


def _sweep_temps(directory, prefix, own_tag):
    host = own_tag.split('-')[0]
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
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
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
        except OSError:
            pass  # alive (EPERM: another user's process)


def _write_all(fd, view):
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _Flusher(object):
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


def _fsync_dir(directory):
    try:
        fd = os.open(directory or '.', os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Batch(object):
    """Written temp files waiting to be made durable and renamed into place.

    One fsync usually commits the filesystem journal for every file written
    before it, so a tree of small files costs a few slow fsyncs, not one per
    file.  Each file is renamed only after its own fsync.
    """

    MAX_FILES = 128       # open descriptors held at once
    MAX_BYTES = 64 << 20

    def __init__(self, durable=True):
        self.durable = durable
        self.pending = []  # (fd, temp, target)
        self.size = 0

    def add(self, fd, temp, target, mode, size):
        """Take charge of ``fd`` and ``temp`` (removed if anything fails)."""
        self.pending.append((fd, temp, target))
        self.size += size
        os.fchmod(fd, mode)
        if len(self.pending) >= self.MAX_FILES or self.size >= self.MAX_BYTES:
            self.commit()

    def commit(self):
        pending = self.pending
        self.size = 0
        directories = set()
        try:
            if self.durable:
                for fd, _, _ in pending:
                    os.fsync(fd)
            while pending:
                fd, temp, target = pending.pop()
                try:
                    os.close(fd)
                    os.rename(temp, target)
                except BaseException:
                    _discard(None, temp)
                    raise
                directories.add(os.path.dirname(target))
        except BaseException:
            self.discard()
            raise
        if self.durable:
            for directory in directories:
                _fsync_dir(directory)

    def discard(self):
        pending, self.pending = self.pending, []
        for fd, temp, _ in pending:
            _discard(fd, temp)


def _discard(fd, temp):
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(temp)
    except OSError:
        pass


def _replace_symlink(target_text, path):
    """Make ``path`` a symlink to ``target_text``, atomically replacing a file or link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode) and os.readlink(path) == target_text:
            return
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, 'a directory is in the way of a symlink', path)
    directory, name = os.path.split(path)
    temp = os.path.join(directory, _temp_prefix(name) + os.urandom(4).hex())
    os.symlink(target_text, temp)
    try:
        os.rename(temp, path)
    except BaseException:
        _discard(None, temp)
        raise


def _make_dir(path, mode):
    """Create directory ``path`` (or accept an existing real one) with ``mode``."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise FileExistsError(errno.EEXIST, 'exists and is not a directory', path)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
        return
    os.chmod(path, mode)


def _digest_file(path):
    h = _digest()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, 'rb', buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


# ======================================================================================
# Remote side (runs on the host, Python 3.6+)
# ======================================================================================

def remote_path(path):
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


def _receive_file(incoming, target, size, durable=True, sweep=False):
    """Write ``size`` bytes from ``incoming`` to a temp file next to ``target``
    and check the digest that follows them: (fd, temp, hex digest)."""
    fd, temp = _temp_file(target, sweep)
    flusher = _Flusher(fd, durable)
    try:
        digest = _digest()
        remaining = size
        written = 0
        while remaining:
            piece = incoming.piece(remaining)
            digest.update(piece)
            try:
                _write_all(fd, piece)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise type(e)(e.errno, '%s after writing %d of %d bytes of %s'
                                  % (os.strerror(e.errno), written, size, target))
                raise
            remaining -= len(piece)
            written += len(piece)
            flusher.wrote(len(piece))
        expected = incoming.exact(DIGEST_SIZE)
        if digest.digest() != expected:
            raise IOError('checksum mismatch writing %s: the controller sent sha1 %s, '
                          'this host received %s; %s was not changed'
                          % (target, expected.hex(), digest.hexdigest(), target))
        flusher.stop()
    except BaseException:
        flusher.stop()
        _discard(fd, temp)
        raise
    return fd, temp, digest.hexdigest()


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
    """Receive what ``put`` sends; runs on the host.

    ``spec``: kind ('file' or 'tree'), name (the source's base name), files
    [(rel, size, mode)], dirs [(rel, mode)], links [(rel, target)], contents
    (True: ``dest`` itself is the root of the tree, as for sync), durable.
    The stream carries, for each file in order, its bytes then their SHA-1.
    """
    incoming = _Incoming(stream)
    durable = spec.get('durable', True)
    if spec['kind'] == 'file':
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
            if os.path.isdir(target):
                raise IsADirectoryError(errno.EISDIR, 'is a directory, cannot replace it '
                                        'with a file', target)
            parent = os.path.dirname(target)
            # os.stat, not os.path.isdir: a directory we may not search is not missing.
            try:
                parent_is_dir = stat.S_ISDIR(os.stat(parent).st_mode)
            except FileNotFoundError:
                parent_is_dir = False
            if not parent_is_dir:
                raise FileNotFoundError(errno.ENOENT, 'the directory %s does not exist'
                                        % parent, target)
        batch = _Batch(durable)
        try:
            fd, temp, sha1 = _receive_file(incoming, target, size, durable, sweep=True)
            batch.add(fd, temp, target, mode, size)
            incoming.finish()
            batch.commit()
        except BaseException:
            batch.discard()
            if dest is None:
                _discard(None, target)
            raise
        return {'remote_path': target, 'size': size, 'sha1sum': sha1, 'mode': mode}

    # a tree
    if dest is None:
        root = tempfile.mkdtemp(prefix='chopsticks-')
    else:
        root = remote_path(dest)
        if os.path.isdir(root) and not spec.get('contents'):
            root = os.path.join(root, spec['name'])
        elif os.path.lexists(root) and not os.path.isdir(root):
            raise NotADirectoryError(errno.ENOTDIR, 'exists and is not a directory', root)
    if not os.path.isdir(root):
        os.makedirs(root)
    root_mode = spec.get('mode')
    if root_mode is not None:
        _make_dir(root, root_mode)
    for rel, mode in spec['dirs']:
        _make_dir(os.path.join(root, rel), mode)
    total = 0
    batch = _Batch(durable)
    try:
        for rel, size, mode in spec['files']:
            target = os.path.join(root, rel)
            if os.path.isdir(target) and not os.path.islink(target):
                raise IsADirectoryError(errno.EISDIR, 'is a directory, cannot replace it '
                                        'with a file', target)
            fd, temp, _ = _receive_file(incoming, target, size, durable)
            batch.add(fd, temp, target, mode, size)
            total += size
        incoming.finish()
        batch.commit()
    except BaseException:
        batch.discard()
        raise
    for rel, target_text in spec['links']:
        _replace_symlink(target_text, os.path.join(root, rel))
    return {'remote_path': root, 'size': total, 'files': [f[0] for f in spec['files']],
            'dirs': [d[0] for d in spec['dirs']], 'links': [l[0] for l in spec['links']],
            'skipped': spec.get('skipped', [])}


def _send_file(fd, chunk):
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
        digest = _digest()
        size = 0
        while not stop.is_set():
            data = os.read(fd, chunk)
            if not data:
                items.put({'size': size, 'sha1sum': digest.hexdigest()})
                return
            digest.update(data)
            size += len(data)
            items.put(data)
    except BaseException as e:
        items.put(e)


def _open_regular_or_dir(path, flags):
    """Open for reading without blocking on a FIFO or a device (checked by the caller)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | flags)
    os.set_blocking(fd, True)
    return fd


def remote_send(path, chunk=FETCH_CHUNK):
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
    fd = _open_regular_or_dir(path, 0)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            yield {'kind': 'file', 'path': path, 'size': st.st_size,
                   'mode': stat.S_IMODE(st.st_mode)}
            for item in _send_file(fd, chunk):
                yield item
            return
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EINVAL, 'not a regular file or a directory', path)
    finally:
        os.close(fd)
    dirs, files, links, skipped = _walk(path)
    yield {'kind': 'tree', 'path': path, 'mode': stat.S_IMODE(st.st_mode), 'dirs': dirs,
           'files': files, 'links': links, 'skipped': skipped}
    for rel, size, mode in files:
        fd = _open_regular_or_dir(os.path.join(path, rel), getattr(os, 'O_NOFOLLOW', 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, 'no longer a regular file', os.path.join(path, rel))
            for item in _send_file(fd, chunk):
                yield item
        finally:
            os.close(fd)


def remote_tree_state(path, sizes):
    """The host's side of ``sync``: what is under ``path``.

    Returns None if ``path`` does not exist, else a dict rel -> entry:
    ('d', mode), ('l', target), ('o',) for anything else, or
    ('f', size, mode, sha1) where sha1 is computed only when ``sizes``
    (rel -> size of the controller's file) says the sizes are equal, else None.
    """
    path = remote_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, 'exists and is not a directory', path)
    dirs, files, links, skipped = _walk(path)
    state = {}
    for rel, mode in dirs:
        state[rel] = ('d', mode)
    for rel, target in links:
        state[rel] = ('l', target)
    for rel in skipped:
        state[rel] = ('o',)
    for rel, size, mode in files:
        digest = None
        if sizes.get(rel) == size:
            digest = _digest_file(os.path.join(path, rel))
        state[rel] = ('f', size, mode, digest)
    return {'path': path, 'entries': state}


def remote_delete(root, rels):
    """Remove ``rels`` (files, links, or whole directories) under ``root``."""
    root = remote_path(root)
    for rel in rels:
        target = os.path.join(root, rel)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(target)
        else:
            os.unlink(target)
    return len(rels)


# ======================================================================================
# Controller side
# ======================================================================================

_ERRNO_RE = re.compile(r'\[Errno (\d+)\]')


def _remote_failure(tunnel, operation, what, exc):
    """A TransferError for a RemoteException raised by one of our remote functions."""
    match = _ERRNO_RE.search(exc.msg)
    code = int(match.group(1)) if match else None
    msg = exc.msg
    if code == errno.ENOSPC:
        msg += ' (the host is out of disk space)'
    elif code in (errno.EACCES, errno.EPERM):
        msg += ' (for the user the tunnel runs as on the host)'
    return TransferError('[%s] %s %s failed: %s: %s'
                         % (tunnel.host, operation, what, exc.type_name, msg),
                         tunnel.host, operation, code, exc.remote_traceback)


def _local_failure(tunnel, operation, what, exc):
    msg = '[%s] %s %s failed: %s' % (tunnel.host, operation, what, exc)
    if exc.errno == errno.ENOSPC:
        msg += ' (this machine is out of disk space)'
    return TransferError(msg, tunnel.host, operation, exc.errno)


def _interrupted(tunnel, operation, what, exc):
    reason = str(exc).replace('[%s] ' % tunnel.host, '', 1)
    return type(exc)('[%s] %s %s interrupted: %s; no partial file was left at the destination'
                     % (tunnel.host, operation, what, reason))


class _Guard(object):
    """Turns the errors of one operation into TransferError / TunnelClosed with context."""

    def __init__(self, tunnel, operation, what):
        self.tunnel = tunnel
        self.operation = operation
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if exc is None or isinstance(exc, TransferError):
            return False
        if isinstance(exc, RemoteException):
            raise _remote_failure(self.tunnel, self.operation, self.what, exc) from exc
        if isinstance(exc, TunnelClosed):
            raise _interrupted(self.tunnel, self.operation, self.what, exc) from exc
        if isinstance(exc, OSError) and not isinstance(exc, ChopsticksError):
            raise _local_failure(self.tunnel, self.operation, self.what, exc) from exc
        return False


# --- progress --------------------------------------------------------------------------

_bar_lock = threading.Lock()
_bar = None
_bar_users = 0


class _Progress(object):
    """Bytes moved by one transfer, shown on a shared rich bar, given to a
    callback, or dropped."""

    def __init__(self, setting, description, total):
        self.total = total
        self.done = 0
        self.callback = None
        self.task = None
        if setting is False or setting is None and (
                total <= PROGRESS_THRESHOLD or not _stderr_is_terminal()):
            return
        if callable(setting) and setting is not True:
            self.callback = setting
            return
        self.task = _bar_add(description, total)

    def advance(self, n):
        self.done += n
        if self.task is not None:
            _bar.update(self.task, advance=n)
        elif self.callback is not None:
            self.callback(self.done, self.total)

    def close(self):
        if self.task is not None:
            _bar_remove(self.task)
            self.task = None


def _stderr_is_terminal():
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _bar_add(description, total):
    """A task on the process-wide progress bar (rich allows one live display)."""
    global _bar, _bar_users
    with _bar_lock:
        if _bar is None:
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                           TimeRemainingColumn, TransferSpeedColumn)
                bar = Progress(TextColumn('{task.description}', markup=False), BarColumn(),
                               DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                               console=Console(stderr=True), transient=True)
                bar.start()
            except Exception:  # no rich, or another live display is running
                return None
            _bar = bar
        _bar_users += 1
        return _bar.add_task(description, total=total)


def _bar_remove(task):
    global _bar, _bar_users
    with _bar_lock:
        if _bar is None:
            return
        _bar.remove_task(task)
        _bar_users -= 1
        if _bar_users == 0:
            _bar.stop()
            _bar = None


# --- put -------------------------------------------------------------------------------

class _Stopped(Exception):
    pass


def _file_chunks(files, progress, host):
    """The bytes of ``files`` [(path, size)], each followed by its SHA-1
    digest, packed into CHUNK-sized pieces.

    A helper thread reads and hashes up to READ_AHEAD pieces ahead, so the
    pipe to the host never waits for the hash.  The pieces are views of a few
    reused buffers: each is only valid until the next one is requested
    (``call_stream`` has written it to the transport by then).
    """
    free = queue.Queue()
    ready = queue.Queue()
    for _ in range(READ_AHEAD):
        free.put(_read_ahead_buffer())
    reader = threading.Thread(target=_read_ahead, args=(files, host, free, ready),
                              name='chopsticks-read', daemon=True)
    reader.start()
    sent = None
    try:
        while True:
            if sent is not None:
                free.put(sent)  # asked for more: the previous piece has been written
                sent = None
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            buf, length, data_bytes = item
            sent = buf
            yield memoryview(buf)[:length]
            progress.advance(data_bytes)
    finally:
        free.put(None)  # stops the reader if it is still running
        reader.join()


def _file_regions(path, size, progress, host):
    """One file's bytes as FileRegions, which a pipe transport sends with
    sendfile, then their SHA-1, from a thread that hashes them meanwhile.

    The bytes then never pass through this process on their way out: a
    256 MiB put was 6-7% faster than through _file_chunks (a fresh tunnel
    per put 470 to 507 MB/s, faster in 9 of 10 alternated runs; a warm one
    551 to 584 MB/s, 10 of 10).  The thread reads them for the hash; it
    does not map the file, since a file truncated under a mapping kills
    the process (SIGBUS).  (A read error in sendfile cannot be told from a
    write error: it ends the connection, where _file_chunks' reader raises
    a TransferError and the tunnel goes on.)
    """
    from .connection import FileRegion  # the controller's side only, as _read_ahead_buffer
    fd = os.open(path, os.O_RDONLY)
    hasher = _Hasher(fd, size)
    try:
        for offset in range(0, size, CHUNK):
            length = min(CHUNK, size - offset)
            yield FileRegion(fd, offset, length)
            progress.advance(length)
        digest = hasher.result()
        if digest is None:
            raise _shrank(host, path)
        yield digest
    finally:
        hasher.stop()
        os.close(fd)


def _shrank(host, path):
    return TransferError('[%s] put %s failed: the file shrank while it was being sent'
                         % (host, path), host, 'put')


class _Hasher(object):
    """The SHA-1 of the first ``size`` bytes of ``fd``, computed by a thread."""

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size
        self.digest = None  # None when the file had fewer bytes
        self.error = None  # an OSError reading it
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name='chopsticks-hash', daemon=True)
        self.thread.start()

    def _run(self):
        buf = _read_ahead_buffer()
        hashed = _digest()
        offset = 0
        while offset < self.size and not self.stopping:
            try:
                n = os.preadv(self.fd, [buf[:min(CHUNK, self.size - offset)]], offset)
            except OSError as e:
                self.error = e
                return
            if not n:
                return
            hashed.update(buf[:n])
            offset += n
        if offset == self.size:
            self.digest = hashed.digest()

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digest

    def stop(self):
        self.stopping = True
        self.thread.join()


def _read_ahead_buffer():
    """A CHUNK-sized buffer for _read_ahead or _Hasher, 64 bytes into an mmap.

    32-byte aligned, because the kernel copies a file into an unaligned
    address two to three times slower (see wire.aligned_buffer; a
    bytearray's data is 16 bytes into its block, and a fresh process's big
    blocks are fresh mappings); but not at the page's start, because
    writing from there to the pipe, behind the frame's 9-byte header, was
    slow.  Measured here, a tunnel's first 256 MiB put: controller CPU 0.82-0.89
    to 0.74-0.77 s; later puts unchanged.
    """
    from . import wire  # the controller's side only: this module also runs on hosts
    return memoryview(wire.aligned_buffer(CHUNK + 64))[64:]


def _read_ahead(files, host, free, ready):
    """The reading thread of _file_chunks: fills buffers from ``free`` into ``ready``."""
    def take():
        buf = free.get()
        if buf is None:
            raise _Stopped()
        return buf, memoryview(buf)

    try:
        buf, view = take()
        pos = data = 0
        for path, size in files:
            hashed = _digest()
            with open(path, 'rb', buffering=0) as f:
                remaining = size
                while remaining:
                    if pos == CHUNK:
                        ready.put((buf, pos, data))
                        buf, view = take()
                        pos = data = 0
                    n = f.readinto(view[pos:pos + min(remaining, CHUNK - pos)])
                    if not n:
                        raise _shrank(host, path)
                    hashed.update(view[pos:pos + n])
                    pos += n
                    data += n
                    remaining -= n
            digest = hashed.digest()
            while digest:
                if pos == CHUNK:
                    ready.put((buf, pos, data))
                    buf, view = take()
                    pos = data = 0
                n = min(len(digest), CHUNK - pos)
                view[pos:pos + n] = digest[:n]
                digest = digest[n:]
                pos += n
        if pos:
            ready.put((buf, pos, data))
        ready.put(None)
    except _Stopped:
        pass
    except BaseException as e:
        ready.put(e)


def _local(path):
    return os.path.expanduser(os.fspath(path))


def put(tunnel, local_path, remote_path=None, mode=0o644, progress=None, durable=True):
    """Copy a local file or directory tree to the host.

    A file: returns ``{'remote_path', 'size', 'sha1sum', 'mode'}``; the host
    checked that the SHA-1 of what it wrote is the one of what was read here.
    ``remote_path`` None means a new temporary file on the host; an existing
    directory receives the file under its own name.  ``mode`` is set exactly
    (no umask); ``None`` keeps the local file's mode.

    A directory: copied like ``cp -r`` (into ``remote_path/<name>`` when
    ``remote_path`` is an existing directory, else to ``remote_path``, or a
    new temporary directory when None), keeping modes and symlinks.  Returns
    ``{'remote_path', 'size', 'files', 'dirs', 'links', 'skipped'}``.

    ``durable=False`` skips the fsyncs (faster for many small files, but a
    crash of the host may then leave empty files).
    """
    local = _local(local_path)
    if remote_path is not None:
        remote_path = os.fspath(remote_path)
    what = '%s -> %s' % (local, remote_path if remote_path is not None else '(temporary file)')
    with _Guard(tunnel, 'put', what):
        st = os.stat(local)
        if stat.S_ISDIR(st.st_mode):
            return _put_tree(tunnel, local, remote_path, st, progress, durable, what)
        if not stat.S_ISREG(st.st_mode):
            raise TransferError('[%s] put %s failed: not a regular file or directory'
                                % (tunnel.host, local), tunnel.host, 'put')
        if mode is None:
            mode = stat.S_IMODE(st.st_mode)
        elif not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise ValueError('mode must be an int like 0o644, not %r' % (mode,))
        size = st.st_size
        name = os.path.basename(local.rstrip('/'))
        spec = {'kind': 'file', 'name': name, 'files': [('', size, mode)], 'durable': durable}
        bar = _Progress(progress, '[%s] put %s' % (tunnel.host, name), size)
        chunks = _file_regions(local, size, bar, tunnel.host)
        try:
            return tunnel.call_stream(remote_receive, chunks, remote_path, spec)
        finally:
            chunks.close()  # stops its reading thread at once, even on errors
            bar.close()


def _put_tree(tunnel, local, remote_path, st, progress, durable, what, contents=False,
              listing=None):
    dirs, files, links, skipped = listing if listing is not None else _walk(local)
    total = sum(size for _, size, _ in files)
    spec = {'kind': 'tree', 'name': os.path.basename(local.rstrip('/')) or 'root',
            'mode': stat.S_IMODE(st.st_mode) if st is not None else None,
            'dirs': dirs, 'files': files, 'links': links, 'skipped': skipped,
            'contents': contents, 'durable': durable}
    bar = _Progress(progress, '[%s] put %s' % (tunnel.host, spec['name']), total)
    chunks = _file_chunks([(os.path.join(local, rel), size) for rel, size, _ in files], bar,
                          tunnel.host)
    try:
        return tunnel.call_stream(remote_receive, chunks, remote_path, spec)
    finally:
        chunks.close()
        bar.close()


# --- fetch -----------------------------------------------------------------------------

class _Items(object):
    """The items of a ``remote_send`` generator, with type checks (the host is not trusted)."""

    def __init__(self, iterator, host):
        self.iterator = iterator
        self.host = host

    def next(self, kind):
        try:
            item = next(self.iterator)
        except StopIteration:
            item = None
        if not isinstance(item, kind):
            raise TransferError('[%s] fetch: the host sent %s where %s was expected'
                                % (self.host, type(item).__name__, getattr(kind, '__name__', kind)),
                                self.host, 'fetch')
        return item

    def end(self):
        """Read the generator's end, so no CANCEL needs to be sent."""
        for item in self.iterator:
            raise TransferError('[%s] fetch: the host sent more than was announced' % self.host,
                                self.host, 'fetch')

    def close(self):
        self.iterator.close()


def _check_rel(host, rel):
    """Refuse a relative path from the host that could escape the destination."""
    if (not isinstance(rel, str) or not rel or '\0' in rel or rel.startswith('/')
            or any(part in ('', '.', '..') for part in rel.split('/'))):
        raise TransferError('[%s] fetch: the host sent an unsafe path %r; nothing was written '
                            'outside the destination' % (host, rel), host, 'fetch')
    return rel


def _check_parents(host, root, rel):
    """Every directory between ``root`` and ``root/rel`` is a real directory, not a symlink."""
    path = root
    for part in rel.split('/')[:-1]:
        path = os.path.join(path, part)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise TransferError('[%s] fetch: %s is not a directory (a symlink?); refusing to write '
                                'through it' % (host, path), host, 'fetch')


def _receive_local(items, target, progress, host, durable=True, sweep=False):
    """Write one file's chunks from ``items`` to ``target`` through a temp file
    and check its trailer; returns (fd, temp, size, trailer) without renaming:
    the caller commits."""
    fd, temp = _temp_file(target, sweep)
    flusher = _Flusher(fd, durable)
    try:
        digest = _digest()
        size = 0
        while True:
            item = items.next((bytes, dict))
            if isinstance(item, dict):
                break
            digest.update(item)
            _write_all(fd, memoryview(item))
            size += len(item)
            progress.advance(len(item))
            flusher.wrote(len(item))
        flusher.stop()
        if item.get('size') != size or item.get('sha1sum') != digest.hexdigest():
            raise TransferError('[%s] fetch %s failed: checksum mismatch (the host read %s bytes '
                                'with sha1 %s, %s bytes with sha1 %s arrived); %s was not '
                                'changed'
                                % (host, target, item.get('size'), item.get('sha1sum'), size,
                                   digest.hexdigest(), target), host, 'fetch')
        return fd, temp, size, item
    except BaseException:
        flusher.stop()
        _discard(fd, temp)
        raise


def fetch(tunnel, remote_path, local_path=None, mode=None, progress=None, durable=True):
    """Copy a file or directory tree from the host.

    A file: returns ``{'local_path', 'remote_path', 'size', 'sha1sum', 'mode'}``.
    ``local_path`` None means a new local temporary file; an existing
    directory receives the file under its own name.  The remote file's
    permission bits are kept unless ``mode`` is given.

    A directory: copied like ``cp -r`` (see ``put``).  Returns
    ``{'local_path', 'remote_path', 'size', 'files', 'dirs', 'links', 'skipped'}``.
    """
    remote = os.fspath(remote_path)
    what = '%s -> %s' % (remote, local_path if local_path is not None else '(temporary file)')
    with _Guard(tunnel, 'fetch', what), tunnel.connection().wide_pipe('receive'):
        items = _Items(tunnel.call_iter(remote_send, remote, FETCH_CHUNK), tunnel.host)
        try:
            header = items.next(dict)
            if header.get('kind') == 'tree':
                return _fetch_tree(tunnel, items, header, remote, local_path, progress, durable)
            size = header.get('size')
            if header.get('kind') != 'file' or not isinstance(size, int):
                raise TransferError('[%s] fetch: unexpected header %r' % (tunnel.host, header),
                                    tunnel.host, 'fetch')
            name = _base_name(remote, header.get('path'), tunnel.host)
            if local_path is None:
                fd, target = tempfile.mkstemp(prefix='chopsticks-', suffix='-' + name)
                os.close(fd)
            else:
                target = _local(local_path)
                if os.path.isdir(target):
                    target = os.path.join(target, name)
                if os.path.isdir(target):
                    raise IsADirectoryError(errno.EISDIR, 'is a directory, cannot replace it '
                                            'with a file', target)
            if mode is None:
                mode = header.get('mode', 0o644) & 0o777
            bar = _Progress(progress, '[%s] fetch %s' % (tunnel.host, name), size)
            batch = _Batch(durable)
            try:
                fd, temp, size, trailer = _receive_local(items, target, bar, tunnel.host,
                                                         durable, sweep=True)
                batch.add(fd, temp, target, mode, size)
                batch.commit()
            except BaseException:
                batch.discard()
                if local_path is None:
                    _discard(None, target)
                raise
            finally:
                bar.close()
            items.end()
            return {'local_path': target, 'remote_path': header.get('path'), 'size': size,
                    'sha1sum': trailer['sha1sum'], 'mode': mode}
        finally:
            items.close()


def _base_name(requested, reported, host):
    name = os.path.basename(requested.rstrip('/'))
    if name in ('', '.', '..', '~') or name.startswith('~'):
        name = os.path.basename(reported or '')
    return _check_rel(host, name) if '/' not in name else 'fetched'


def _fetch_tree(tunnel, items, header, remote, local_path, progress, durable):
    host = tunnel.host
    dirs, files, links = header.get('dirs'), header.get('files'), header.get('links')
    if not (isinstance(dirs, list) and isinstance(files, list) and isinstance(links, list)):
        raise TransferError('[%s] fetch: malformed tree listing' % host, host, 'fetch')
    if local_path is None:
        root = tempfile.mkdtemp(prefix='chopsticks-')
    else:
        root = _local(local_path)
        if os.path.isdir(root):
            root = os.path.join(root, _base_name(remote, header.get('path'), host))
        elif os.path.lexists(root):
            raise NotADirectoryError(errno.ENOTDIR, 'exists and is not a directory', root)
    if not os.path.isdir(root):
        os.makedirs(root)
    root_mode = header.get('mode')
    if isinstance(root_mode, int):
        _make_dir(root, root_mode & 0o777)
    for rel, mode in dirs:
        _check_rel(host, rel)
        _check_parents(host, root, rel)
        _make_dir(os.path.join(root, rel), int(mode) & 0o777)
    total = sum(size for _, size, _ in files if isinstance(size, int))
    bar = _Progress(progress, '[%s] fetch %s' % (host, os.path.basename(root)), total)
    done = []
    batch = _Batch(durable)
    try:
        for rel, size, mode in files:
            _check_rel(host, rel)
            _check_parents(host, root, rel)
            target = os.path.join(root, rel)
            if os.path.isdir(target) and not os.path.islink(target):
                raise IsADirectoryError(errno.EISDIR, 'is a directory, cannot replace it '
                                        'with a file', target)
            fd, temp, size, _ = _receive_local(items, target, bar, host, durable)
            batch.add(fd, temp, target, int(mode) & 0o777, size)
            done.append(rel)
        batch.commit()
    except BaseException:
        batch.discard()
        raise
    finally:
        bar.close()
    for rel, target_text in links:
        _check_rel(host, rel)
        _check_parents(host, root, rel)
        if not isinstance(target_text, str) or '\0' in target_text:
            raise TransferError('[%s] fetch: bad symlink target for %r' % (host, rel), host,
                                'fetch')
        _replace_symlink(target_text, os.path.join(root, rel))
    items.end()
    return {'local_path': root, 'remote_path': header.get('path'), 'size': total, 'files': done,
            'dirs': [d[0] for d in dirs], 'links': [l[0] for l in links],
            'skipped': list(header.get('skipped') or [])}


# --- sync ------------------------------------------------------------------------------

def sync(tunnel, local_dir, remote_dir, delete=False, check=False, progress=None, durable=True):
    """Make ``remote_dir`` hold what ``local_dir`` holds, sending only files
    whose content (SHA-1) differs; like ``rsync -a --checksum local_dir/ remote_dir``.

    Files whose content is equal but whose mode differs are chmod'ed (and
    counted as updated), symlinks are recreated when their target differs,
    and with ``delete=True`` whatever ``remote_dir`` holds beyond
    ``local_dir`` is removed.  ``check=True`` changes nothing and reports what
    would change.

    Returns ``{'created': [...], 'updated': [...], 'deleted': [...], 'unchanged': n}``:
    relative paths (directories end with ``/``), sorted; ``unchanged`` counts
    files and symlinks.
    """
    local = _local(local_dir)
    remote_dir = os.fspath(remote_dir)
    what = '%s -> %s' % (local, remote_dir)
    with _Guard(tunnel, 'sync', what):
        st = os.stat(local)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, 'not a directory', local)
        dirs, files, links, skipped = _walk(local)
        sizes = {rel: size for rel, size, _ in files}
        remote_future = tunnel.call_async(remote_tree_state, remote_dir, sizes)
        local_hashes = {rel: _digest_file(os.path.join(local, rel)) for rel, _, _ in files}
        state = remote_future.result()
        entries = state['entries'] if state else {}

        created, updated, deleted = [], [], []
        send_files, send_dirs, send_links, chmods = [], [], [], []
        conflicts = []
        unchanged = 0
        local_names = set()
        for rel, mode in dirs:
            local_names.add(rel)
            there = entries.get(rel)
            if there is None:
                created.append(rel + '/')
            elif there[0] != 'd':
                conflicts.append(rel)
                updated.append(rel + '/')
            elif there[1] != mode:
                updated.append(rel + '/')
            send_dirs.append((rel, mode))
        for rel, size, mode in files:
            local_names.add(rel)
            there = entries.get(rel)
            if there is None:
                created.append(rel)
                send_files.append((rel, size, mode))
            elif there[0] != 'f':
                conflicts.append(rel)
                updated.append(rel)
                send_files.append((rel, size, mode))
            elif there[3] != local_hashes[rel]:
                updated.append(rel)
                send_files.append((rel, size, mode))
            elif there[2] != mode:
                updated.append(rel)
                chmods.append((rel, mode))
            else:
                unchanged += 1
        for rel, target in links:
            local_names.add(rel)
            there = entries.get(rel)
            if there is None:
                created.append(rel)
                send_links.append((rel, target))
            elif there[0] != 'l':
                conflicts.append(rel)
                updated.append(rel)
                send_links.append((rel, target))
            elif there[1] != target:
                updated.append(rel)
                send_links.append((rel, target))
            else:
                unchanged += 1
        if delete:
            gone = set()  # directories removed whole: their contents go with them
            for rel in sorted(entries):
                if rel in local_names or _under(rel, gone):
                    continue
                if entries[rel][0] == 'd':
                    gone.add(rel)
                    deleted.append(rel + '/')
                else:
                    deleted.append(rel)
        if conflicts and not delete:
            raise TransferError('[%s] sync %s: on the host, %s %s of a different kind (file, '
                                'directory or symlink) than here; pass delete=True to replace them'
                                % (tunnel.host, what, ', '.join(sorted(conflicts)[:5]),
                                   'is' if len(conflicts) == 1 else 'are'), tunnel.host, 'sync')
        report = {'created': sorted(created), 'updated': sorted(updated),
                  'deleted': sorted(deleted), 'unchanged': unchanged}
        if check:
            return report

        removals = [d.rstrip('/') for d in deleted] + conflicts
        if removals:
            tunnel.call(remote_delete, remote_dir, sorted(removals, reverse=True))
        if send_files or send_links or send_dirs or state is None:
            _put_tree(tunnel, local, remote_dir, st, progress, durable, what, contents=True,
                      listing=(send_dirs, send_files, send_links, []))
        if chmods:
            tunnel.call(remote_chmod, remote_dir, chmods)
        return report


def _under(rel, directories):
    parts = rel.split('/')
    return any('/'.join(parts[:i]) in directories for i in range(1, len(parts)))


def remote_chmod(root, modes):
    root = remote_path(root)
    for rel, mode in modes:
        os.chmod(os.path.join(root, rel), mode)

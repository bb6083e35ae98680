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
  file is removed: by the agent itself when the controller hangs up in the
  middle (it is killed, or a Ctrl-C ends the script), as the agent leaves.
  Only an agent killed outright cannot remove its own (a Local or Sudo
  agent whose tunnel a script left open is killed at interpreter exit);
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

* A tree is written relative to directory descriptors opened with O_NOFOLLOW
  on both sides: a symlink planted in a destination (or swapped in while a
  transfer runs) is refused, never followed, and so is a symlinked root.
  Local files are opened with O_NOFOLLOW and must be the very files the walk
  saw: one swapped for a link meanwhile fails the put, its target unread.

The host's half lives in :mod:`chopsticks.files_remote` (stdlib only, Python
3.6), the only module a transfer ships to a host; this module is the
controller's half.
"""
import errno
import os
import re
import stat
import tempfile
from typing import (
    TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union,
)

from . import files_remote
from .errors import ChopsticksError, RemoteException, TunnelClosed
from .files_remote import (
    CLOEXEC, FETCH_CHUNK, Dirs, Flusher, TreeWriter, digest, digest_fd,
    discard, open_file, open_root, walk, write_all,
)
from .files_source import file_chunks, file_regions
from .progress import ProgressSetting, TransferProgress

if TYPE_CHECKING:
    from .tunnel import BaseTunnel

__all__ = ['put', 'fetch', 'sync', 'TransferError', 'plan_sync', 'SyncPlan']

PathLike = Union[str, 'os.PathLike[str]']
# The walk of a tree: dirs [(rel, mode)], files [(rel, size, mode)], links [(rel, target)], skipped.
Listing = Tuple[List[Tuple[str, int]], List[Tuple[str, int, int]], List[Tuple[str, str]], List[str]]


class TransferError(ChopsticksError, OSError):
    """A put, fetch or sync failed.  The destination was left unchanged
    (for a tree: files already completed stay).

    ``host``, ``operation`` (``'put'``, ``'fetch'``, ``'sync'``), ``errno``
    (None when the cause was not an OSError) and ``remote_traceback`` (when
    the remote side failed) are attributes; the message says all of it.
    """

    def __init__(self, message: str, host: Optional[str] = None, operation: Optional[str] = None,
                 errno: Optional[int] = None, remote_traceback: str = '') -> None:
        super().__init__(message)
        self.host = host
        self.operation = operation
        self.errno = errno
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return self.args[0]


# ======================================================================================
# Errors with context
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


def _local(path):
    return os.path.expanduser(os.fspath(path))


# ======================================================================================
# put
# ======================================================================================

def put(tunnel: 'BaseTunnel', local_path: PathLike, remote_path: Optional[PathLike] = None,
        mode: Optional[int] = 0o644, progress: ProgressSetting = None,
        durable: bool = True) -> Dict[str, Any]:
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
    remote = os.fspath(remote_path) if remote_path is not None else None
    what = '%s -> %s' % (local, remote if remote is not None else '(temporary file)')
    with _Guard(tunnel, 'put', what):
        # Opened first, then looked at: what is sent is what was looked at.
        # (Without blocking on a FIFO; a link named as the source is followed, like cp.)
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                dirs, fd = Dirs(fd, local), -1  # the Dirs closes it
                with dirs:
                    return _put_tree(tunnel, dirs, remote, st, progress, durable)
            if not stat.S_ISREG(st.st_mode):
                raise TransferError('[%s] put %s failed: not a regular file or directory'
                                    % (tunnel.host, local), tunnel.host, 'put')
            os.set_blocking(fd, True)
            if mode is None:
                mode = stat.S_IMODE(st.st_mode)
            elif not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
                raise ValueError('mode must be an int like 0o644, not %r' % (mode,))
            size = st.st_size
            name = os.path.basename(local.rstrip('/'))
            spec = {'kind': 'file', 'name': name, 'files': [('', size, mode)],
                    'durable': durable}
            bar = TransferProgress(progress, '[%s] put %s' % (tunnel.host, name), size)
            chunks = file_regions(fd, local, size, bar)
            try:
                return tunnel.call_stream(files_remote.remote_receive, chunks, remote, spec)
            finally:
                chunks.close()  # stops its hashing thread at once, even on errors
                bar.close()
        finally:
            if fd >= 0:
                os.close(fd)


def _put_tree(tunnel, dirs, remote, st, progress, durable, contents=False, listing=None,
              ids=None):
    """Send the tree below ``dirs`` (or the part of it ``listing`` names,
    whose files ``ids`` identifies) to ``remote``."""
    if listing is None:
        ids = {}
        listing = walk(dirs, ids)
    found_dirs, files, links, skipped = listing
    total = sum(size for _, size, _ in files)
    spec = {'kind': 'tree', 'name': os.path.basename(dirs.root_path.rstrip('/')) or 'root',
            'mode': stat.S_IMODE(st.st_mode) if st is not None else None,
            'dirs': found_dirs, 'files': files, 'links': links, 'skipped': skipped,
            'contents': contents, 'durable': durable}
    bar = TransferProgress(progress, '[%s] put %s' % (tunnel.host, spec['name']), total)
    chunks = file_chunks(dirs, [(rel, size, ids[rel]) for rel, size, _ in files], bar)
    try:
        return tunnel.call_stream(files_remote.remote_receive, chunks, remote, spec)
    finally:
        chunks.close()
        bar.close()


# ======================================================================================
# fetch
# ======================================================================================

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


def _is_mode(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o7777


def _checked_entries(host, entries, fields):
    """A host's listing ``entries``, each a sequence of ``fields`` (kinds:
    'rel', 'mode', 'size', 'text'), checked before anything is written;
    anything else is a TransferError naming the entry."""
    checks = {'mode': _is_mode, 'text': lambda v: isinstance(v, str) and '\0' not in v,
              'size': lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              'rel': lambda v: _check_rel(host, v)}
    if not isinstance(entries, list):
        raise TransferError('[%s] fetch: malformed tree listing (%s, not a list)'
                            % (host, type(entries).__name__), host, 'fetch')
    checked = []
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == len(fields)
                and all(checks[kind](value) for kind, value in zip(fields, entry))):
            raise TransferError('[%s] fetch: the host sent a malformed tree entry %.200r; '
                                'nothing was written' % (host, entry), host, 'fetch')
        checked.append(tuple(entry))
    return checked


def _receive_local(items, fd, target, progress, host, durable=True):
    """Write one file's chunks from ``items`` to ``fd`` and check its trailer:
    (size, trailer)."""
    flusher = Flusher(fd, durable)
    try:
        hashed = digest()
        size = 0
        while True:
            item = items.next((bytes, dict))
            if isinstance(item, dict):
                break
            hashed.update(item)
            write_all(fd, memoryview(item))
            size += len(item)
            progress.advance(len(item))
            flusher.wrote(len(item))
    finally:
        flusher.stop()
    if item.get('size') != size or item.get('sha1sum') != hashed.hexdigest():
        raise TransferError('[%s] fetch %s failed: checksum mismatch (the host read %s bytes '
                            'with sha1 %s, %s bytes with sha1 %s arrived); %s was not changed'
                            % (host, target, item.get('size'), item.get('sha1sum'), size,
                               hashed.hexdigest(), target), host, 'fetch')
    return size, item


def _receive_into(tree, rel, items, progress, host, mode, sweep=False):
    """Receive one file from ``items`` as ``rel`` of ``tree`` (committed by the caller)."""
    fd, dir_fd, temp, name = tree.open_temp(rel, sweep)
    try:
        size, trailer = _receive_local(items, fd, tree.dirs.path(rel), progress, host,
                                       tree.durable)
    except BaseException:
        discard(fd, dir_fd, temp)
        raise
    tree.add(fd, dir_fd, temp, name, mode, size)
    return size, trailer


def fetch(tunnel: 'BaseTunnel', remote_path: PathLike, local_path: Optional[PathLike] = None,
          mode: Optional[int] = None, progress: ProgressSetting = None,
          durable: bool = True) -> Dict[str, Any]:
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
    host = tunnel.host
    with _Guard(tunnel, 'fetch', what), tunnel.connection().wide_pipe('receive'):
        items = _Items(tunnel.call_iter(files_remote.remote_send, remote, FETCH_CHUNK), host)
        try:
            header = items.next(dict)
            if header.get('kind') == 'tree':
                return _fetch_tree(tunnel, items, header, remote, local_path, progress, durable)
            size = header.get('size')
            if (header.get('kind') != 'file' or not isinstance(size, int)
                    or not _is_mode(header.get('mode', 0o644))):
                raise TransferError('[%s] fetch: unexpected header %.200r' % (host, header),
                                    host, 'fetch')
            name = _base_name(remote, header.get('path'), host)
            if local_path is None:
                fd, target = tempfile.mkstemp(prefix='chopsticks-', suffix='-' + name)
                os.close(fd)
            else:
                target = _local(local_path)
                if os.path.isdir(target):
                    target = os.path.join(target, name)
            if mode is None:
                mode = header.get('mode', 0o644) & 0o777
            bar = TransferProgress(progress, '[%s] fetch %s' % (host, name), size)
            parent, name = os.path.split(target)
            try:
                # the user named this directory: it may be a link (/tmp -> /private/tmp)
                with Dirs(open_root(parent or '.', follow=True), parent or '.') as dirs:
                    tree = TreeWriter(dirs, durable)
                    try:
                        size, trailer = _receive_into(tree, name, items, bar, host, mode, True)
                        tree.commit()
                    except BaseException:
                        tree.discard()
                        raise
            except BaseException:
                if local_path is None:
                    discard(None, None, target)
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
    dirs = _checked_entries(host, header.get('dirs'), ('rel', 'mode'))
    files = _checked_entries(host, header.get('files'), ('rel', 'size', 'mode'))
    links = _checked_entries(host, header.get('links'), ('rel', 'text'))
    skipped = header.get('skipped') or []
    if not (isinstance(skipped, list) and all(isinstance(rel, str) for rel in skipped)):
        raise TransferError('[%s] fetch: the host sent a malformed list of skipped files %.200r'
                            % (host, skipped), host, 'fetch')
    root_mode = header.get('mode')
    if local_path is None:
        root = tempfile.mkdtemp(prefix='chopsticks-')
    else:
        root = _local(local_path)
        if os.path.isdir(root):
            root = os.path.join(root, _base_name(remote, header.get('path'), host))
    total = sum(size for _, size, _ in files)
    bar = TransferProgress(progress, '[%s] fetch %s' % (host, os.path.basename(root)), total)
    with Dirs(open_root(root, create=True), root) as root_dirs:
        tree = TreeWriter(root_dirs, durable)
        if _is_mode(root_mode):
            tree.make_dir('', root_mode & 0o777)
        for rel, mode in dirs:
            tree.make_dir(rel, mode & 0o777)
        try:
            for rel, size, mode in files:
                _receive_into(tree, rel, items, bar, host, mode & 0o777)
            tree.commit()
        except BaseException:
            tree.discard()
            raise
        finally:
            bar.close()
        for rel, target_text in links:
            tree.link(rel, target_text)
    items.end()
    return {'local_path': root, 'remote_path': header.get('path'), 'size': total,
            'files': [f[0] for f in files], 'dirs': [d[0] for d in dirs],
            'links': [l[0] for l in links], 'skipped': skipped}


# ======================================================================================
# sync
# ======================================================================================

class SyncPlan(NamedTuple):
    """What ``sync`` does: the report it returns and the work behind it."""
    created: List[str]      # relative paths; directories end with '/'
    updated: List[str]
    deleted: List[str]
    unchanged: int          # files and symlinks
    listing: Listing        # what to put: every directory, changed files and links
    chmods: List[Tuple[str, int]]   # files whose content is equal but mode differs
    removals: List[str]     # what to delete on the host, children before parents
    conflicts: List[str]    # entries of another kind on the host (replaced only with delete)

    def report(self) -> Dict[str, Any]:
        return {'created': sorted(self.created), 'updated': sorted(self.updated),
                'deleted': sorted(self.deleted), 'unchanged': self.unchanged}


def plan_sync(local: Listing, local_digests: Dict[str, str],
              remote_entries: Optional[Dict[str, Sequence[Any]]], delete: bool) -> SyncPlan:
    """The plan that makes the host's tree (``remote_entries`` as
    ``remote_tree_state`` gives them, None when there is none) equal the
    local one (``local``, a walk, and the SHA-1 of each file).  Pure: no I/O."""
    entries = remote_entries or {}
    local_dirs, local_files, local_links, _ = local
    # One row per local entry: (rel, kind, content, mode, listing row); content
    # is a file's digest or a link's target, mode None where it does not apply.
    rows: List[Tuple[str, str, Any, Any, tuple]]
    rows = ([(rel, 'd', None, mode, (rel, mode)) for rel, mode in local_dirs]
            + [(rel, 'f', local_digests[rel], mode, (rel, size, mode))
               for rel, size, mode in local_files]
            + [(rel, 'l', target, None, (rel, target)) for rel, target in local_links])
    created: List[str] = []
    updated: List[str] = []
    deleted: List[str] = []
    conflicts: List[str] = []
    send: Dict[str, list] = {'d': [], 'f': [], 'l': []}
    chmods: List[Tuple[str, int]] = []
    unchanged = 0
    for rel, kind, content, mode, row in rows:
        shown = rel + '/' if kind == 'd' else rel
        there = entries.get(rel)
        if there is None:
            created.append(shown)
        elif there[0] != kind:
            conflicts.append(rel)
            updated.append(shown)
        elif content != _remote_content(there)[0]:
            updated.append(shown)
        elif mode != _remote_content(there)[1]:
            updated.append(shown)
            if kind == 'f':  # put sets a directory's mode; a file's alone is a chmod
                chmods.append((rel, mode))
                continue
        elif kind != 'd':  # every directory goes to put, which makes sure it exists
            unchanged += 1
            continue
        send[kind].append(row)
    if delete:
        local_names = {row[0] for row in rows}
        gone: Set[str] = set()  # directories removed whole take their contents
        for rel in sorted(entries):
            if rel in local_names or _under(rel, gone):
                continue
            if entries[rel][0] == 'd':
                gone.add(rel)
                deleted.append(rel + '/')
            else:
                deleted.append(rel)
    removals = sorted([d.rstrip('/') for d in deleted] + conflicts, reverse=True)
    return SyncPlan(created, updated, deleted, unchanged, (send['d'], send['f'], send['l'], []),
                    chmods, removals, conflicts)


def _remote_content(entry):
    """(content, mode) of a remote_tree_state entry, comparable with plan_sync's rows."""
    kind = entry[0]
    if kind == 'd':
        return None, entry[1]
    if kind == 'f':
        return entry[3], entry[2]
    if kind == 'l':
        return entry[1], None
    return None, None


def _under(rel, directories):
    parts = rel.split('/')
    return any('/'.join(parts[:i]) in directories for i in range(1, len(parts)))


def sync(tunnel: 'BaseTunnel', local_dir: PathLike, remote_dir: PathLike, delete: bool = False,
         check: bool = False, progress: ProgressSetting = None,
         durable: bool = True) -> Dict[str, Any]:
    """Make ``remote_dir`` hold what ``local_dir`` holds, sending only files
    whose content (SHA-1) differs; like ``rsync -a --checksum local_dir/ remote_dir``.

    Files whose content is equal but whose mode differs are chmod'ed (and
    counted as updated), symlinks are recreated when their target differs,
    and with ``delete=True`` whatever ``remote_dir`` holds beyond
    ``local_dir`` is removed.  ``check=True`` changes nothing and reports what
    would change.  A ``remote_dir`` that is a symlink is refused.

    Returns ``{'created': [...], 'updated': [...], 'deleted': [...], 'unchanged': n}``:
    relative paths (directories end with ``/``), sorted; ``unchanged`` counts
    files and symlinks.
    """
    local = _local(local_dir)
    remote = os.fspath(remote_dir)
    what = '%s -> %s' % (local, remote)
    host = tunnel.host
    with _Guard(tunnel, 'sync', what), Dirs(open_root(local, follow=True), local) as dirs:
        st = os.fstat(dirs.root_fd)
        ids: Dict[str, Tuple[int, int]] = {}
        listing = walk(dirs, ids)
        sizes = {rel: size for rel, size, _ in listing[1]}
        remote_future = tunnel.call_async(files_remote.remote_tree_state, remote, sizes)
        digests = {}
        for rel, _, _ in listing[1]:
            fd = open_file(dirs, rel, ids[rel])
            try:
                digests[rel] = digest_fd(fd)
            finally:
                os.close(fd)
        state = remote_future.result()
        try:
            if state is not None and not isinstance(state['entries'], dict):
                raise TypeError('entries is a %s' % type(state['entries']).__name__)
            plan = plan_sync(listing, digests, state['entries'] if state else None, delete)
        except (LookupError, TypeError, ValueError, AttributeError) as e:
            raise TransferError('[%s] sync %s: the host sent a malformed tree state (%s: %s)'
                                % (host, what, type(e).__name__, e), host, 'sync') from e
        if plan.conflicts and not delete:
            raise TransferError('[%s] sync %s: on the host, %s %s of a different kind (file, '
                                'directory or symlink) than here; pass delete=True to replace them'
                                % (host, what, ', '.join(sorted(plan.conflicts)[:5]),
                                   'is' if len(plan.conflicts) == 1 else 'are'), host, 'sync')
        if check:
            return plan.report()
        if plan.removals:
            tunnel.call(files_remote.remote_delete, remote, plan.removals)
        if any(plan.listing[:3]) or state is None:
            _put_tree(tunnel, dirs, remote, st, progress, durable, contents=True,
                      listing=plan.listing, ids=ids)
        if plan.chmods:
            tunnel.call(files_remote.remote_chmod, remote, plan.chmods)
        return plan.report()

"""The file tasks, as they run on the host: standard library only, Python 3.6+.

Each task is a plain function: call it through a tunnel
(``tunnel.call(file, '/etc/motd', 'hello\\n')``) or from your own function
running on the host.  Each one looks at the path, works out what must change,
changes it (unless ``check=True``) and looks again; the result compares the
two looks::

    {'changed': True, 'check': False, 'path': '/etc/motd',
     'changed_attributes': ['content', 'mode'],
     'before': {'sha256': '3b5d...', 'mode': '0600'},
     'after': {'sha256': '2cf2...', 'mode': '0644'},
     'diff': '--- before: /etc/motd\\n+++ after: /etc/motd\\n...',
     'backup': None}

``before`` and ``after`` hold only the attributes that changed.  In check
mode ``after`` is the plan and nothing on the host is touched.

Bad input (a missing parent directory, an unknown user, a directory where a
file should be) raises :class:`FileTaskError` before anything changes; its
message names the task, the path and the argument at fault.

Only what every task needs is imported here: difflib, shutil and hashlib's
OpenSSL binding would add 8 ms to each host's first task (see _sha256,
_mkstemp).
"""
import errno
import functools
import grp
import os
import pwd
import re
import stat
import sys
import time

__all__ = ['file', 'directory', 'line', 'link', 'FileTaskError',
           'file_by_digest', 'file_from_stream', 'DIFF_LIMIT']

#: Contents larger than this (before or after) get a one-line note instead of
#: a unified diff: a diff of megabytes helps nobody and costs memory here.
DIFF_LIMIT = 1 << 20
_READ_CHUNK = 1 << 20


class FileTaskError(Exception):
    """A file task refused its input or could not do its work.

    ``task``, ``path`` and ``argument`` (the argument at fault, or None) are
    attributes; the message names all three.  Over a tunnel it arrives as a
    :class:`chopsticks.errors.RemoteException`, which adds the host.
    """

    def __init__(self, task, path, argument, problem):
        self.task = task
        self.path = path
        self.argument = argument
        self.problem = problem
        super(FileTaskError, self).__init__('%s(path=%r): %s' % (task, path, problem))


# -- input -------------------------------------------------------------------------


def _path(task, path):
    if not isinstance(path, str) or not path:
        raise FileTaskError(task, path, 'path', 'path must be a non-empty string, not %r' % (path,))
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        raise FileTaskError(task, path, 'path', 'path must be absolute (or start with ~)')
    return os.path.normpath(expanded)


def _state(task, path, state, allowed=('present', 'absent')):
    if state not in allowed:
        raise FileTaskError(task, path, 'state', 'state=%r: must be one of %s'
                            % (state, ', '.join(repr(s) for s in allowed)))
    return state


def _uid(task, path, owner):
    if owner is None:
        return None
    if isinstance(owner, int) and not isinstance(owner, bool) and owner >= 0:
        return owner
    if isinstance(owner, str) and owner.isdigit():
        return int(owner)
    if isinstance(owner, str) and owner:
        try:
            return pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise FileTaskError(task, path, 'owner', 'owner=%r: no such user on this host' % owner)
    raise FileTaskError(task, path, 'owner', 'owner=%r: give a user name or a uid' % (owner,))


def _gid(task, path, group):
    if group is None:
        return None
    if isinstance(group, int) and not isinstance(group, bool) and group >= 0:
        return group
    if isinstance(group, str) and group.isdigit():
        return int(group)
    if isinstance(group, str) and group:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise FileTaskError(task, path, 'group', 'group=%r: no such group on this host' % group)
    raise FileTaskError(task, path, 'group', 'group=%r: give a group name or a gid' % (group,))


def _mode(task, path, mode):
    """An int (``0o644``) or an octal string (``'0644'``, ``'644'``, ``'0o644'``)."""
    if mode is None:
        return None
    value = None
    if isinstance(mode, int) and not isinstance(mode, bool):
        value = mode
    elif isinstance(mode, str):
        digits = mode.strip()
        digits = digits[2:] if digits.lower().startswith('0o') else digits
        if digits and all(c in '01234567' for c in digits):
            value = int(digits, 8)
    if value is None or not 0 <= value <= 0o7777:
        raise FileTaskError(task, path, 'mode', "mode=%r: give an int like 0o644 or an octal "
                            "string like '0644' (symbolic modes are not supported)" % (mode,))
    return value


def _content(task, path, content):
    if isinstance(content, str):
        return content.encode('utf-8', 'surrogateescape')
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    raise FileTaskError(task, path, 'content', 'content must be str or bytes, not %s'
                        % type(content).__name__)


def _reports(task, path_at=0):
    """Decorator: an OSError the task did not expect (a directory it may not
    search, say) becomes a FileTaskError naming the task, the path and the user."""
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except FileTaskError:
                raise
            except OSError as exc:
                path = args[path_at] if len(args) > path_at else kwargs.get('path')
                raise FileTaskError(task, path, None, '%s: %s (as %s)' % (
                    exc.filename or path, exc.strerror or exc, _whoami()))
        return run
    return decorate


# -- looking at the host -------------------------------------------------------------


def _stat(path, follow=True):
    try:
        return os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a parent is a file
        return None


def _kind(st):
    mode = st.st_mode
    for test, name in ((stat.S_ISDIR, 'a directory'), (stat.S_ISREG, 'a regular file'),
                       (stat.S_ISLNK, 'a symlink'), (stat.S_ISFIFO, 'a named pipe'),
                       (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
                       (stat.S_ISBLK, 'a block device')):
        if test(mode):
            return name
    return 'not a regular file'


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _whoami():
    return "user %r (uid %d)" % (_user_name(os.geteuid()), os.geteuid())


def _umask():
    """The process umask, read without changing it where /proc allows (Linux 4.7+):
    ``os.umask`` sets it for every thread of the agent while we look."""
    try:
        with open('/proc/self/status') as status:
            for text in status:
                if text.startswith('Umask:'):
                    return int(text.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sha256(data=b''):
    """A SHA-256 hash object: the interpreter's own when it has one (``_sha256``,
    ``_sha2`` from 3.12), so that hashlib, which loads OpenSSL (4 ms), is not
    imported on the host."""
    try:
        from _sha256 import sha256
    except ImportError:
        try:
            from _sha2 import sha256
        except ImportError:
            from hashlib import sha256
    return sha256(data)


def _read(path, limit=None):
    """(sha256 hex, bytes or None when larger than ``limit``) of a regular file."""
    digest = _sha256()
    kept = []
    size = 0
    with open(path, 'rb') as f:
        while True:
            block = f.read(_READ_CHUNK)
            if not block:
                break
            digest.update(block)
            size += len(block)
            if limit is None or size <= limit:
                kept.append(block)
    data = b''.join(kept) if limit is None or size <= limit else None
    return digest.hexdigest(), data


def _new_group(directory):
    """The group a file created in ``directory`` gets: the directory's when it is setgid."""
    st = _stat(directory)
    if st is not None and st.st_mode & stat.S_ISGID:
        return st.st_gid
    return os.getegid()


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is done
    finally:
        os.close(fd)


# -- results -------------------------------------------------------------------------


def _attributes(st, sha256=None):
    """What we compare: the file's attributes (and content digest when known)."""
    if st is None:
        return {'state': 'absent'}
    found = {'state': 'present', 'mode': '%04o' % stat.S_IMODE(st.st_mode),
             'owner': _user_name(st.st_uid), 'group': _group_name(st.st_gid)}
    if sha256 is not None:
        found['content'] = sha256
    return found


def _result(task, path, check, before, after, **extra):
    names = [k for k in ('state', 'content', 'mode', 'owner', 'group', 'target')
             if before.get(k) != after.get(k) and (k in before or k in after)]
    if 'state' in names:  # created or removed: the state, and a new file's content
        names = ['state'] + (['content'] if after.get('state') == 'present'
                             and 'content' in after else [])
    result = {'changed': bool(names), 'check': bool(check), 'path': path,
              'changed_attributes': names,
              'before': dict((k, before[k]) for k in names if k in before),
              'after': dict((k, after[k]) for k in names if k in after),
              'diff': ''}
    result.update(extra)
    return result


def _is_text(data):
    if b'\0' in data[:8192]:
        return False
    try:
        data.decode('utf-8')
    except UnicodeDecodeError:
        return False
    return True


def _diff(path, old, new, old_size, new_size):
    """A unified diff of two contents, or a one-line note when that would not help."""
    if old is None or new is None or max(old_size, new_size) > DIFF_LIMIT:
        return ('content of %s: %d bytes -> %d bytes (over %d KiB: not diffed)\n'
                % (path, old_size, new_size, DIFF_LIMIT // 1024))
    if not (_is_text(old) and _is_text(new)):
        return 'binary content of %s: %d bytes -> %d bytes\n' % (path, old_size, new_size)
    out = []
    import difflib

    for text in difflib.unified_diff(old.decode('utf-8').splitlines(True),
                                     new.decode('utf-8').splitlines(True),
                                     'before: %s' % path, 'after: %s' % path):
        out.append(text if text.endswith('\n') else text + '\n\\ No newline at end of file\n')
    return ''.join(out)


# -- content sources: what file() writes ----------------------------------------------


class _Bytes(object):
    """Content held in memory (the common case: one round trip)."""

    def __init__(self, data):
        self.data = data
        self.size = len(data)
        self.sha256 = _sha256(data).hexdigest()

    def write(self, fd):
        view = memoryview(self.data)
        while view:
            view = view[os.write(fd, view):]


class _Digest(object):
    """Only the digest of the content: enough to tell whether the host has it."""
    data = None

    def __init__(self, sha256, size):
        self.sha256 = sha256
        self.size = size


class _Stream(object):
    """Content arriving in chunks (``Tunnel.call_stream``); checked against its digest."""
    data = None

    def __init__(self, chunks, sha256, size):
        self.chunks = chunks
        self.sha256 = sha256
        self.size = size

    def write(self, fd):
        digest = _sha256()
        written = 0
        for chunk in self.chunks:
            view = memoryview(chunk).cast('B')
            digest.update(view)
            written += len(view)
            while view:
                view = view[os.write(fd, view):]
        if written != self.size or digest.hexdigest() != self.sha256:
            raise IOError('the content arrived damaged: %d bytes with sha256 %s, expected %d '
                          'bytes with sha256 %s' % (written, digest.hexdigest(), self.size,
                                                    self.sha256))


class _NeedContent(Exception):
    """file_by_digest: the host lacks the content; the controller must send it."""


# -- writing -------------------------------------------------------------------------


def _atomic_write(task, path, source, mode, uid, gid):
    """Write ``source`` to a temp file beside ``path``, fsync it, rename it over
    ``path``, fsync the directory.  On any failure the temp file is removed and
    ``path`` is as it was."""
    directory = os.path.dirname(path)
    try:
        fd, temp = _mkstemp(path)
    except OSError as exc:
        raise _os_error(task, path, 'cannot create a file in %s' % directory, exc)
    try:
        try:
            source.write(fd)
            if uid is not None or gid is not None:
                # before fchmod: chown clears setuid/setgid bits
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, FileTaskError):
            raise _os_error(task, path, 'cannot write %s' % path, exc)
        raise
    finally:
        _written(temp)
    _fsync_dir(directory)


# -- temp files ------------------------------------------------------------------------
#
# Named as chopsticks.files_remote names those of put and sync (this plugin,
# standard library only, cannot import it): '.NAME.chopsticks-<host>-<pid>-<hex>',
# NAME cut to fit NAME_MAX.  The host tag and process id tell which temp files
# a killed writer left behind, so that the next write to NAME sweeps them, and
# a file task sweeps what an interrupted put left, and the other way round.

_TEMP_MARK = '.chopsticks-'
# NAME's share of NAME_MAX (255 bytes): the rest takes 36 ('.', the mark, a
# 6-digit host tag, a pid of up to 7 digits, 8 hex digits, two dashes).
_TEMP_NAME_ROOM = 200
_host_tags = {}


def _fit_name(name, limit=_TEMP_NAME_ROOM):
    """The longest start of ``name`` taking at most ``limit`` bytes on disk, cut
    between characters (80 CJK characters are 240 bytes; an undecodable byte,
    a surrogate escape, is one)."""
    cut = name[:limit]
    while len(os.fsencode(cut)) > limit:
        cut = cut[:-1]
    return cut


def _host_tag():
    """Six hex digits naming this machine (as files_remote's), cached per process."""
    tag = _host_tags.get(os.getpid())
    if tag is None:
        try:
            from _sha1 import sha1
        except ImportError:
            from hashlib import sha1
        name = os.uname().nodename.encode('utf-8', 'replace')
        tag = _host_tags[os.getpid()] = sha1(name).hexdigest()[:6]
    return tag


def _temp_path(path):
    """(a new temp path for ``path``, in its directory; the prefix all of them share)."""
    directory, name = os.path.split(path)
    prefix = '.%s%s' % (_fit_name(name), _TEMP_MARK)
    temp = '%s%s-%d-%s' % (prefix, _host_tag(), os.getpid(), os.urandom(4).hex())
    return os.path.join(directory, temp), prefix


def _sweep_temps(directory, prefix):
    """Remove the temp files for the same target that a dead process of this
    host left in ``directory`` (a live one's, or another host's, stay)."""
    host = _host_tag()
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


def _agent_temp_files():
    """The running agent's registry of temp files being written, if a
    chopsticks agent runs us (as files_remote's _agent_temp_files)."""
    return getattr(sys.modules.get('_chopsticks_agent'), 'temp_files', None)


def _writing(temp):
    """Tell the agent that ``temp`` is being written: if it must leave at
    once (the controller hung up), it removes it, since our own cleanup will
    not run.  See _written."""
    temp_files = _agent_temp_files()
    if temp_files is not None:
        temp_files[os.path.basename(temp)] = temp


def _written(temp):
    temp_files = _agent_temp_files()
    if temp_files is not None:
        temp_files.pop(os.path.basename(temp), None)


def _mkstemp(path):
    """A new temp file for ``path``, beside it, that only this user may read,
    opened: (fd, temp path); the temp files dead writers left for ``path`` are
    swept first.  Not tempfile: it imports shutil and random, 4 ms on each host."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0) \
        | getattr(os, 'O_CLOEXEC', 0)
    temp, prefix = _temp_path(path)
    _sweep_temps(os.path.dirname(path), prefix)
    for _ in range(100):
        try:
            fd = os.open(temp, flags, 0o600)
        except FileExistsError:
            temp = _temp_path(path)[0]
            continue
        _writing(temp)
        return fd, temp
    raise FileExistsError(errno.EEXIST, 'no unused temporary name in %s' % os.path.dirname(path))


def _os_error(task, path, what, exc):
    return FileTaskError(task, path, None, '%s as %s: %s' % (what, _whoami(), exc.strerror or exc))


def _backup(task, path, st):
    """A copy of ``path`` beside it, named for the time; returns its path."""
    stamp = time.strftime('%Y-%m-%d@%H:%M:%S', time.localtime())
    backup = '%s.%s.%06d~' % (path, stamp, int(time.time() * 1e6) % 1000000)
    import shutil

    try:
        shutil.copy2(path, backup)
        os.chown(backup, st.st_uid, st.st_gid)
        os.chmod(backup, stat.S_IMODE(st.st_mode))
    except OSError as exc:
        raise _os_error(task, path, 'cannot back up %s to %s' % (path, backup), exc)
    return backup


def _set_attributes(task, path, st, uid, gid, mode, follow=True):
    try:
        if (uid is not None and uid != st.st_uid) or (gid is not None and gid != st.st_gid):
            (os.chown if follow else os.lchown)(path, -1 if uid is None else uid,
                                               -1 if gid is None else gid)
            st = os.stat(path) if follow else os.lstat(path)
        if mode is not None and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
    except OSError as exc:
        raise _os_error(task, path, 'cannot change the owner, group or mode of %s' % path, exc)


# -- file ------------------------------------------------------------------------------


@_reports('file')
def file(path, content=None, *, owner=None, group=None, mode=None, state='present',
         backup=False, check=False):
    """Make ``path`` a regular file with this content, owner, group and mode.

    - ``content``: str (written as UTF-8) or bytes; None leaves an existing
      file's content alone and creates a missing file empty.
    - ``owner`` / ``group``: a name or a numeric id; ``mode``: an int
      (``0o644``) or an octal string (``'0644'``).  Attributes not given are
      kept when the content is replaced; a new file gets the host's umask
      and belongs to whoever the tunnel runs as.
    - ``state='absent'``: remove the file (or symlink); a missing one is fine.
    - ``backup=True``: before replacing the content, keep a copy named
      ``PATH.YYYY-MM-DD@HH:MM:SS.uuuuuu~``; its path is the result's ``backup``.
    - ``check=True``: change nothing; the result is the plan, diff included.

    A symlink at ``path`` is followed: the file it points to is written.
    The content is written to a temp file in the same directory, fsynced and
    renamed over ``path`` (then the directory is fsynced): on any failure the
    old file is untouched and no temp file stays behind.  The parent
    directory must exist (see :func:`directory`); in check mode a missing one
    is reported in ``warning`` instead, so that a whole deployment can be
    checked before an earlier task of it has created the directory.
    """
    source = None if content is None else _Bytes(_content('file', path, content))
    return _file('file', path, source, owner, group, mode, state, backup, check)


@_reports('file')
def file_by_digest(path, sha256, size, *, owner=None, group=None, mode=None, state='present',
                   backup=False, check=False):
    """:func:`file` when only the content's SHA-256 is sent: ``{'need_content': True}``
    when the host must be sent the content (``chopsticks_files.upload`` does it)."""
    try:
        return _file('file', path, _Digest(sha256, size), owner, group, mode, state, backup, check)
    except _NeedContent:
        return {'need_content': True}


@_reports('file', path_at=1)
def file_from_stream(stream, path, sha256, size, *, owner=None, group=None, mode=None,
                     backup=False, check=False):
    """:func:`file` with the content streamed (``Tunnel.call_stream``), checked
    against ``sha256`` and ``size`` before it replaces the old file."""
    return _file('file', path, _Stream(stream, sha256, size), owner, group, mode, 'present',
                 backup, check)


def _file(task, path, source, owner, group, mode, state, backup, check):
    given = path
    path = _path(task, path)
    _state(task, given, state)
    uid, gid, mode = _uid(task, given, owner), _gid(task, given, group), _mode(task, given, mode)
    if state == 'absent':
        return _remove_file(task, path, check)

    target = os.path.realpath(path)  # write through a symlink, do not replace it
    st = _stat(target)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise FileTaskError(task, given, 'path', '%s is %s, not a regular file'
                            % (target, _kind(st)))
    directory = os.path.dirname(target)
    warning = None
    if st is None:
        warning = _missing_parent(task, given, directory, check)
        if source is None:
            source = _Bytes(b'')

    old_sha, old_data = (None, None)
    if st is not None and source is not None:
        try:
            old_sha, old_data = _read(target, DIFF_LIMIT)
        except OSError as exc:
            raise _os_error(task, given, 'cannot read %s' % target, exc)
    writes = source is not None and (st is None or old_sha != source.sha256)
    before = _attributes(st, old_sha)

    if st is None:
        new_mode = mode if mode is not None else 0o666 & ~_umask()
        new_uid = uid if uid is not None else os.geteuid()
        new_gid = gid if gid is not None else _new_group(directory)
    else:
        new_mode = mode if mode is not None else stat.S_IMODE(st.st_mode)
        new_uid = uid if uid is not None else st.st_uid
        new_gid = gid if gid is not None else st.st_gid
    diff = ''
    if writes:
        if source.data is None and isinstance(source, _Digest) and (
                not check or source.size <= DIFF_LIMIT):
            raise _NeedContent()  # to write it, or (small) to diff it
        diff = _diff(target, old_data if st is not None else b'', source.data,
                     st.st_size if st is not None else 0, source.size)

    backup_path = None
    if check:
        planned = dict(_attributes(st, old_sha) if st is not None else {},
                       state='present', mode='%04o' % new_mode, owner=_user_name(new_uid),
                       group=_group_name(new_gid))
        if source is not None:
            planned['content'] = source.sha256
        result = _result(task, target, True, before, planned, diff=diff, backup=None)
        if warning:
            result['warning'] = warning
        return result

    if writes:
        if backup and st is not None:
            backup_path = _backup(task, target, st)
        keep_owner = st is not None or uid is not None or gid is not None
        _atomic_write(task, target, source, new_mode,
                      new_uid if keep_owner else None, new_gid if keep_owner else None)
    else:
        _set_attributes(task, target, st, uid, gid, mode)
    after_st = os.stat(target)
    # The digest of what was just written was checked while writing: do not
    # read a large file again to learn it.
    after = _attributes(after_st, source.sha256 if source is not None else None)
    if not writes and source is not None:
        after['content'] = old_sha
    return _result(task, target, False, before, after, diff=diff, backup=backup_path)


def _missing_parent(task, given, directory, check):
    """None when ``directory`` exists.  Else an error; in check mode a warning
    instead, so that a deployment checked as a whole can plan a file in a
    directory an earlier task of it would create."""
    parent = _stat(directory)
    if parent is not None and stat.S_ISDIR(parent.st_mode):
        return None
    problem = 'the parent directory %s does not exist' % directory
    if check:
        return problem + ': the real run fails unless an earlier task creates it'
    raise FileTaskError(task, given, 'path', problem + ' (create it with directory())')


def _remove_file(task, path, check):
    st = _stat(path, follow=False)
    if st is None:
        return _result(task, path, check, {'state': 'absent'}, {'state': 'absent'}, backup=None)
    if stat.S_ISDIR(st.st_mode):
        raise FileTaskError(task, path, 'path', "%s is a directory: remove it with "
                            "directory(path, state='absent')" % path)
    diff = ''
    if stat.S_ISREG(st.st_mode):
        try:
            _, data = _read(path, DIFF_LIMIT)
            diff = _diff(path, data, b'', st.st_size, 0)
        except OSError:
            diff = ''  # unreadable but removable (a write-only file): no diff
    if not check:
        try:
            os.unlink(path)
        except OSError as exc:
            raise _os_error(task, path, 'cannot remove %s' % path, exc)
        _fsync_dir(os.path.dirname(path))
        after = _attributes(_stat(path, follow=False))
    else:
        after = {'state': 'absent'}
    return _result(task, path, check, {'state': 'present'}, {'state': after['state']},
                   diff=diff, backup=None)


# -- line ------------------------------------------------------------------------------


def _split_lines(text):
    """Lines with their endings; only ``\\n`` ends a line (``str.splitlines`` would
    also split on form feeds and U+2028, which config files may hold)."""
    parts = text.split('\n')
    lines = [p + '\n' for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _body(text):
    if text.endswith('\r\n'):
        return text[:-2]
    return text[:-1] if text.endswith('\n') else text


def _regex(task, path, argument, pattern):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise FileTaskError(task, path, argument, '%s=%r is not a regular expression: %s'
                            % (argument, pattern, exc))


@_reports('line')
def line(path, line, *, match=None, state='present', create=False, after=None, check=False):
    """Make sure a line is in a text file (or, ``state='absent'``, is not).

    Ansible's ``lineinfile``, with these arguments: ``match`` is its
    ``regexp``, ``after`` its ``insertafter``, ``create`` its ``create``.

    - present, with ``match``: the last line ``match`` finds (``re.search``)
      is replaced by ``line``; when no line matches but ``line`` itself is in
      the file, nothing changes; otherwise ``line`` is inserted after the last
      line the ``after`` expression finds, or appended at the end when
      ``after`` is None, ``'EOF'`` or finds nothing.
    - present, without ``match``: nothing changes when ``line`` is in the file
      already; otherwise it is inserted as above.
    - absent: every line ``match`` finds (or, without ``match``, every line
      equal to ``line``) is removed.  A missing file is fine.

    The file's other lines, their endings (``\\r\\n`` kept) and the file's
    owner, group and mode are kept; the write is atomic as in :func:`file`.
    A missing file is an error unless ``create=True`` (``state='present'``).

    Where it differs from Ansible: no ``insertbefore``, ``firstmatch``,
    ``backrefs`` or ``backup``; the new line ends in ``\\r\\n`` when the file's
    first line does (Ansible always writes ``os.linesep``); a symlink is
    followed (Ansible's ``follow`` defaults to no and replaces the link);
    ``line`` must be a single line (Ansible accepts embedded newlines and
    then never finds the line again, so it appends it on every run);
    ``match`` and ``after`` see each line without its ending (Ansible's
    ``regexp`` sees the newline too, so there ``r'db\\s'`` matches ``'db\\n'``);
    a replaced line keeps its ending (Ansible writes ``os.linesep``).
    """
    task = 'line'
    given = path
    path = _path(task, path)
    _state(task, given, state)
    if not isinstance(line, str) or '\n' in line or '\r' in line:
        raise FileTaskError(task, given, 'line', 'line=%r: give one line of text, without '
                            'its newline' % (line,))
    regex = _regex(task, given, 'match', match)
    after_regex = None if after in (None, 'EOF') else _regex(task, given, 'after', after)
    target = os.path.realpath(path)
    st = _stat(target)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise FileTaskError(task, given, 'path', '%s is %s, not a text file' % (target, _kind(st)))
    if st is None:
        if state == 'absent':
            return _result(task, target, check, {'state': 'absent'}, {'state': 'absent'})
        if not create:
            raise FileTaskError(task, given, 'create', '%s does not exist (pass create=True '
                                'to create it)' % target)
        old = b''
    else:
        try:
            with open(target, 'rb') as f:
                old = f.read()
        except OSError as exc:
            raise _os_error(task, given, 'cannot read %s' % target, exc)

    lines = _split_lines(old.decode('utf-8', 'surrogateescape'))
    if state == 'absent':
        lines = [l for l in lines
                 if not (regex.search(_body(l)) if regex is not None else _body(l) == line)]
    else:
        ending = '\r\n' if lines and lines[0].endswith('\r\n') else '\n'
        found = None
        for i, text in enumerate(lines):
            if (regex.search(_body(text)) if regex is not None else _body(text) == line):
                found = i
        if found is not None:
            old_line = lines[found]
            lines[found] = line + old_line[len(_body(old_line)):]
        elif not any(_body(text) == line for text in lines):
            at = len(lines)
            if after_regex is not None:
                for i, text in enumerate(lines):
                    if after_regex.search(_body(text)):
                        at = i + 1
            if at == len(lines) and lines and not lines[-1].endswith('\n'):
                lines[-1] += ending
            lines.insert(at, line + ending)
    new = ''.join(lines).encode('utf-8', 'surrogateescape')
    if st is not None and new == old:
        return _result(task, target, check, _attributes(st), _attributes(st))
    return _file(task, target, _Bytes(new), None, None, None, 'present', False, check)


# -- directory ---------------------------------------------------------------------------


@_reports('directory')
def directory(path, *, owner=None, group=None, mode=None, recurse=False, state='present',
              check=False):
    """Make ``path`` a directory with this owner, group and mode.

    Missing parent directories are created too (``mkdir -p``; they get the
    umask's mode and are listed in ``created``).  With ``recurse=True`` the
    owner and group are also set on everything below (symlinks themselves,
    never followed) and the mode on every directory below; a file below
    gets the mode's read and write bits, and its execute bits only when it
    had one already (``chmod -R`` with ``X``), so that setting 0o755 on a
    tree does not make every file executable.  Paths changed below are
    listed in ``changed_paths`` (the first 100; ``changed_paths_count`` has
    the number).

    ``state='absent'`` removes the directory and everything in it; ``path``
    being a file or a symlink is an error (see :func:`file`, :func:`link`).
    """
    task = 'directory'
    given = path
    path = _path(task, path)
    _state(task, given, state)
    uid, gid, mode = _uid(task, given, owner), _gid(task, given, group), _mode(task, given, mode)
    lst = _stat(path, follow=False)
    st = _stat(path)
    if lst is not None and (st is None or not stat.S_ISDIR(st.st_mode)):
        raise FileTaskError(task, given, 'path', '%s is %s, not a directory'
                            % (path, _kind(st or lst)))

    if state == 'absent':
        if lst is None:
            return _result(task, path, check, {'state': 'absent'}, {'state': 'absent'})
        if stat.S_ISLNK(lst.st_mode):
            raise FileTaskError(task, given, 'path', "%s is a symlink to a directory: remove the "
                                "link with link(path, target, state='absent')" % path)
        if not check:
            import shutil

            try:
                shutil.rmtree(path)
            except OSError as exc:
                raise _os_error(task, given, 'cannot remove %s' % path, exc)
        after = {'state': 'absent'} if check else _attributes(_stat(path, follow=False))
        return _result(task, path, check, {'state': 'present'}, {'state': after['state']})

    created = []
    if st is None:
        missing = path
        while _stat(missing, follow=False) is None:
            created.insert(0, missing)
            missing = os.path.dirname(missing)
        ancestor = _stat(missing)  # the nearest that exists (through symlinks)
        if ancestor is None or not stat.S_ISDIR(ancestor.st_mode):
            raise FileTaskError(task, given, 'path', '%s is not a directory: cannot create %s '
                                'in it' % (missing, path))
    before = _attributes(st)
    changed_paths = []
    if check:
        if st is None:
            after = {'state': 'present',
                     'mode': '%04o' % (mode if mode is not None else 0o777 & ~_umask()),
                     'owner': _user_name(uid if uid is not None else os.geteuid()),
                     'group': _group_name(gid if gid is not None else
                                          _new_group(os.path.dirname(path)))}
        else:
            after = dict(before)
            if uid is not None:
                after['owner'] = _user_name(uid)
            if gid is not None:
                after['group'] = _group_name(gid)
            if mode is not None:
                after['mode'] = '%04o' % mode
            if recurse:
                changed_paths = _recurse(task, given, path, uid, gid, mode, apply=False)
    else:
        for new in created:
            try:
                os.mkdir(new)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _os_error(task, given, 'cannot create %s' % new, exc)
        _set_attributes(task, path, os.stat(path), uid, gid, mode)
        if recurse and st is not None:
            changed_paths = _recurse(task, given, path, uid, gid, mode, apply=True)
        if created:
            _fsync_dir(os.path.dirname(created[0]))
        after = _attributes(os.stat(path))
    result = _result(task, path, check, before, after, created=created,
                     changed_paths=changed_paths[:100], changed_paths_count=len(changed_paths))
    if changed_paths:
        result['changed'] = True
    return result


def _recurse(task, given, root, uid, gid, mode, apply):
    changed = []
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            want_mode = None
            if mode is not None and not stat.S_ISLNK(st.st_mode):
                if stat.S_ISDIR(st.st_mode):
                    want_mode = mode
                else:
                    has_x = st.st_mode & 0o111
                    want_mode = (mode & 0o666) | ((mode & 0o111) if has_x else 0)
            if ((uid is not None and uid != st.st_uid) or (gid is not None and gid != st.st_gid)
                    or (want_mode is not None and want_mode != stat.S_IMODE(st.st_mode))):
                changed.append(path)
                if apply:
                    _set_attributes(task, path, st, uid, gid, want_mode,
                                    follow=not stat.S_ISLNK(st.st_mode))
    return changed


# -- link ------------------------------------------------------------------------------


@_reports('link')
def link(path, target, *, state='present', check=False):
    """Make ``path`` a symlink to ``target`` (or, ``state='absent'``, not a symlink).

    ``target`` is written into the link as given (relative targets resolve
    from the link's directory) and need not exist.  A symlink pointing
    elsewhere is replaced atomically (a new link renamed over it); a file or
    directory at ``path`` is an error, never replaced.  The parent directory
    must exist (in check mode: a ``warning``, as in :func:`file`).
    """
    task = 'link'
    given = path
    path = _path(task, path)
    _state(task, given, state)
    if not isinstance(target, str) or not target:
        raise FileTaskError(task, given, 'target', 'target=%r: give the path the link points '
                            'to' % (target,))
    lst = _stat(path, follow=False)
    if lst is not None and not stat.S_ISLNK(lst.st_mode):
        raise FileTaskError(task, given, 'path', '%s is %s, not a symlink: remove it first'
                            % (path, _kind(lst)))
    old = os.readlink(path) if lst is not None else None
    before = {'state': 'absent'} if old is None else {'state': 'present', 'target': old}
    directory = os.path.dirname(path)

    if state == 'absent':
        if old is not None and not check:
            try:
                os.unlink(path)
            except OSError as exc:
                raise _os_error(task, given, 'cannot remove %s' % path, exc)
            _fsync_dir(directory)
        return _result(task, path, check, before, {'state': 'absent'})

    warning = _missing_parent(task, given, directory, check)
    if old != target and not check:
        temp = _temp_path(path)[0]
        try:
            os.symlink(target, temp)
            os.replace(temp, path)
        except OSError as exc:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise _os_error(task, given, 'cannot make the symlink %s' % path, exc)
        _fsync_dir(directory)
    now = target if check else os.readlink(path)
    result = _result(task, path, check, before, {'state': 'present', 'target': now})
    if warning:
        result['warning'] = warning
    if result['changed']:
        result['diff'] = 'symlink %s: %s -> %s\n' % (path, old if old is not None else '(none)',
                                                    target)
    return result

"""Hosts that misbehave during file transfers, for tests/test_files_hostile.py.

These run on the host (served by the import hook in place of the real
``files_remote`` functions), so this file is stdlib-only and runs on Python 3.6.
"""
import os

VICTIM = 'victim'  # the directory beside a sync's destination that a swap points at


def tree_state_then_swap_sub(path, sizes):
    """``remote_tree_state``, after which (between sync's plan and its work)
    the destination's ``sub`` directory is swapped for a symlink to
    ``../victim``, as a user owning part of the tree could."""
    from chopsticks import files_remote
    state = files_remote.remote_tree_state(path, sizes)
    root = files_remote.remote_path(path)
    os.rename(os.path.join(root, 'sub'), os.path.join(root, 'sub.moved'))
    os.symlink(os.path.join(os.path.dirname(root), VICTIM), os.path.join(root, 'sub'))
    return state


def _tree(path, dirs, files, data):
    yield {'kind': 'tree', 'path': path, 'mode': 0o755, 'dirs': dirs, 'files': files,
           'links': [], 'skipped': []}
    import hashlib
    for _ in files:
        yield data
        yield {'size': len(data), 'sha1sum': hashlib.sha1(data).hexdigest()}


def send_bad_mode(path, chunk=None):
    """A tree whose one file's mode is not a number."""
    yield from _tree(path, [], [('f', 3, 'rwx')], b'abc')


def send_bad_file_entry(path, chunk=None):
    """A tree whose file entry lacks its mode."""
    yield from _tree(path, [], [('f', 3)], b'abc')


def send_bad_dir_entry(path, chunk=None):
    """A tree whose directory entry is a bare number."""
    yield from _tree(path, [7], [('f', 3, 0o644)], b'abc')


def send_bad_size(path, chunk=None):
    """A tree whose file size is a string."""
    yield from _tree(path, [], [('f', '3', 0o644)], b'abc')


def send_file_bad_mode(path, chunk=None):
    """A single file whose mode is not a number."""
    yield {'kind': 'file', 'path': path, 'size': 3, 'mode': 'rw-r--r--'}
    yield b'abc'
    import hashlib
    yield {'size': 3, 'sha1sum': hashlib.sha1(b'abc').hexdigest()}


def tree_state_malformed(path, sizes):
    """A sync's tree state whose one entry is a bare number."""
    return {'path': path, 'entries': {'sub': 7}}

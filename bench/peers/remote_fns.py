"""Functions the benchmark calls on the remote side.

They live in a module of their own, not in a script's ``__main__``, so each
library ships them the way it ships any user code: pickled by reference and
served by its import hook (ours, chopsticks 1.0, mitogen). Stdlib only.
"""


def noop():
    """The trivial call: nothing to do, nothing to return."""
    return None


def echo(data):
    """Return the argument unchanged (bytes round trips)."""
    return data


def file_size(path):
    import os
    return os.path.getsize(path)


def mitogen_get_file(master, path, dest):
    """Pull ``path`` from the master's FileService into ``dest`` (mitogen's put)."""
    import mitogen.service
    with open(dest, 'wb') as out:
        ok, metadata = mitogen.service.FileService.get(master, path, out)
    if not ok:
        raise IOError('mitogen FileService transfer of %s was cut short' % path)
    return metadata['size']

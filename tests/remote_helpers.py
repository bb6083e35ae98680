"""Functions the tests call on remote hosts.

Kept apart from the test modules so that serving them to a remote does not
drag pytest along: this file is stdlib-only and runs on Python 3.6.
"""
import threading
import time

PRODUCED = []
FLAGS = {}  # name -> threading.Event, shared by the calls of one agent


class Unsendable(object):
    pass


def echo(value):
    return value


def fail(message):
    raise KeyError(message)


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def return_unsendable():
    return Unsendable()


def generate_and_record(n):
    for i in range(n):
        PRODUCED.append(i)
        yield i


def produced_so_far():
    return len(PRODUCED)


def _flag(name):
    return FLAGS.setdefault(name, threading.Event())


def wait_for_flag(name, timeout):
    """True once another call raised ``name``; False after ``timeout`` seconds."""
    return _flag(name).wait(timeout)


def raise_flag(name):
    _flag(name).set()
    return name


def note_then_sleep(path, seconds):
    """Append a line to ``path`` (a log of calls started), then sleep."""
    with open(path, 'a') as f:
        f.write('.\n')
    time.sleep(seconds)


def agent_pipe_sizes(stream=None):
    """The capacity of the agent's stdin and stdout pipes (after reading ``stream``)."""
    import fcntl
    import sys
    for _ in stream or ():
        pass
    agent = sys.modules['_chopsticks_agent'].agent
    return fcntl.fcntl(agent.rfd, 1032), fcntl.fcntl(agent.channel.fd, 1032)


def joined(stream):
    """The types of a stream's chunks and their bytes joined."""
    chunks = list(stream)
    return sorted(set(type(c).__name__ for c in chunks)), b''.join(chunks)


def send_with_a_wrong_digest(path, chunk=None):
    """A host that lies: ``files.remote_send``'s items for ``path``, with a
    trailer whose SHA-1 is not the one of the bytes sent."""
    with open(path, 'rb') as f:
        data = f.read()
    yield {'kind': 'file', 'path': path, 'size': len(data), 'mode': 0o644}
    yield data
    yield {'size': len(data), 'sha1sum': '0' * 40}


def sys_path():
    import sys
    return list(sys.path)

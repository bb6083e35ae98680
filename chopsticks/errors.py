"""The exceptions a chopsticks user can see.  Every message names the host."""

__all__ = [
    'ChopsticksError', 'RemoteException', 'ConnectError', 'TunnelClosed',
    'CallTimeout', 'ProtocolError', 'DepthLimitExceeded', 'CommandFailed', 'CommandTimeout',
    'FileLimitError',
]


class ChopsticksError(Exception):
    """Base class of the errors chopsticks raises itself."""


class RemoteException(ChopsticksError):
    """The remote function raised.

    ``host`` is the tunnel's host name, ``type_name`` the remote exception's
    qualified type name (``'KeyError'``, ``'subprocess.CalledProcessError'``),
    ``msg`` its message and ``remote_traceback`` the remote traceback as text,
    as the host sent them.  ``str()`` escapes their control characters
    (tabs and line breaks kept; ``chopsticks.display.printable``): printed
    on a terminal, a host's text cannot repaint it.  The tunnel remains usable.
    """

    def __init__(self, host, type_name, msg, remote_traceback=''):
        self.host = host
        self.type_name = type_name
        self.msg = msg
        self.remote_traceback = remote_traceback
        super().__init__(host, type_name, msg, remote_traceback)

    def __str__(self):
        text = '[%s] %s: %s' % (self.host, _escaped(self.type_name), _escaped(self.msg))
        if self.remote_traceback:
            text += '\n\nRemote traceback (from %s):\n%s' % (
                self.host, _escaped(str(self.remote_traceback).rstrip()))
        return text


def _escaped(text):
    """A host's ``text`` with control characters escaped, line by line."""
    from .display import printable_lines  # only when shown: it imports json
    return printable_lines(str(text))


class ConnectError(ChopsticksError, ConnectionError):
    """Could not start the agent on the host.

    ``stderr`` holds what ssh, sudo or the remote python printed.
    """

    def __init__(self, host, msg, stderr=''):
        self.host = host
        self.reason = msg
        self.stderr = stderr
        text = '[%s] could not connect: %s' % (host, msg)
        if stderr.strip():
            text += '\n' + '\n'.join('  ' + _escaped(line) for line in stderr.strip().splitlines()[-30:])
        super().__init__(text)


class TunnelClosed(ChopsticksError, ConnectionError):
    """The connection was lost (or closed) while a call was pending."""


class ProtocolError(TunnelClosed):
    """The remote sent bytes that are not valid protocol; the tunnel was closed."""


class CallTimeout(ChopsticksError, TimeoutError):
    """A call did not finish within its ``timeout``."""


class DepthLimitExceeded(ChopsticksError):
    """Tunnels opened through tunnels nested deeper than the configured limit."""


class FileLimitError(ChopsticksError, OSError):
    """A group needs more file descriptors than ``RLIMIT_NOFILE`` lets this
    process open; raised before any of its hosts connects.

    ``limit`` (what may be open), ``needed`` (about what the group would
    have open) and ``hosts`` (how many would connect).
    """

    def __init__(self, msg, limit=0, needed=0, hosts=0):
        super().__init__(msg)
        self.limit = limit
        self.needed = needed
        self.hosts = hosts


class CommandFailed(ChopsticksError):
    """A shell command (``tunnel.run``) exited non-zero.

    ``host``, ``command`` (as text), ``returncode``, ``stderr`` (its last
    lines) and ``result`` (the whole :class:`~chopsticks.shell.CommandResult`).
    """

    def __init__(self, host, command, returncode, stderr='', result=None):
        self.host = host
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        self.result = result
        super().__init__(host, command, returncode, stderr)

    def _what(self):
        return 'exited with status %s' % self.returncode

    def __str__(self):
        text = '[%s] command %r %s' % (self.host, self.command, self._what())
        if self.stderr.strip():
            text += '\n' + '\n'.join('  ' + _escaped(line) for line in self.stderr.strip().splitlines())
        return text


class CommandTimeout(CommandFailed, CallTimeout):
    """A shell command ran past its ``timeout``; its process group was killed."""

    def _what(self):
        return 'timed out, and was killed'

"""Whether this process may open the file descriptors a group of tunnels needs.

Each tunnel that runs a local process (``Local``, ``Sudo``, ``Docker``, an
OpenSSH ``SSHTunnel``) holds three pipes to it while connected: its stdin,
stdout and stderr.  A thousand hosts need three thousand descriptors, and a
process may open only ``RLIMIT_NOFILE`` of them: past it every connect fails
on its own with ``[Errno 24] Too many open files``.  The scheduler asks
:func:`check_descriptors` first, and a group that cannot fit fails at once,
before any host connects, saying which limit to raise.

This module runs on Python 3.6 too (a relay host may fan out from there).
"""
import os

from .errors import FileLimitError

__all__ = ['check_descriptors', 'descriptors_needed', 'FDS_PER_PROCESS', 'FileLimitError']

FDS_PER_PROCESS = 3   # a tunnel's stdin, stdout and stderr pipes, while connected
FDS_PER_SOCKET = 1    # an in-process (paramiko) SSH connection
# A connect in progress holds five more for a moment: the child's ends of the
# three pipes until it has started, and subprocess's pipe for exec errors.
FDS_PER_CONNECTING = 5
FDS_SPARE = 16        # for what the program opens meanwhile: logs, sockets, imports


def _tunnel_descriptors(tunnel):
    """Descriptors ``tunnel`` opens in this process when it connects."""
    from .tunnel import SubprocessTunnel
    if getattr(tunnel, 'via', None) is not None:
        return 0  # its relay holds the pipes (counted once, as a tunnel of its own)
    if not isinstance(tunnel, SubprocessTunnel):
        return 0  # another kind of tunnel: it knows its own costs
    if getattr(tunnel, 'transport_type', 'openssh') == 'paramiko':
        return FDS_PER_SOCKET
    return FDS_PER_PROCESS


def descriptors_needed(tunnels, max_connect):
    """(new descriptors to connect every tunnel not connected yet, with
    ``max_connect`` connects at once; how many tunnels open them)."""
    total = connecting = 0
    relays = {}
    for tunnel in tunnels:
        if getattr(tunnel, 'connected', True):
            continue
        via = getattr(tunnel, 'via', None)
        if via is not None and not getattr(via, 'connected', True):
            relays[id(via)] = via
        need = _tunnel_descriptors(tunnel)
        if need:
            total += need
            connecting += 1
    for relay in relays.values():
        if not any(relay is t for t in tunnels):
            need = _tunnel_descriptors(relay)
            if need:
                total += need
                connecting += 1
    if connecting:
        total += min(connecting, max_connect) * FDS_PER_CONNECTING
    return total, connecting


def _open_descriptors():
    for directory in ('/proc/self/fd', '/dev/fd'):
        try:
            return len(os.listdir(directory)) - 1  # less the one listdir used
        except OSError:
            continue
    return 0


def check_descriptors(tunnels, max_connect, what='connecting'):
    """Raise :class:`~chopsticks.errors.FileLimitError` if connecting every
    tunnel of ``tunnels`` not connected yet would pass this process's
    ``RLIMIT_NOFILE`` hard limit (the soft limit is raised to the hard one)."""
    tunnels = list(tunnels)
    needed, hosts = descriptors_needed(tunnels, max_connect)
    if not needed:
        return
    try:
        import resource
    except ImportError:
        return  # not Unix: no such limit to check
    from .broker import raise_fd_limit
    raise_fd_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = soft if soft != resource.RLIM_INFINITY else hard
    if limit == resource.RLIM_INFINITY:
        return
    in_use = _open_descriptors()
    want = in_use + needed + FDS_SPARE
    if want <= limit:
        return
    suggestion = 1 << max(10, (want + hosts * FDS_PER_PROCESS).bit_length())
    raise FileLimitError(
        '%s on %d hosts needs about %d file descriptors (%d per tunnel: the stdin, stdout and '
        'stderr pipes of its process; %d for connects in progress; %d open already), but '
        'RLIMIT_NOFILE allows %d (soft %s, hard %s).  Nothing was connected.  Raise the hard '
        'limit before Python starts: `ulimit -Hn %d` (as root; for a user, `* hard nofile %d` '
        'in /etc/security/limits.conf), `LimitNOFILE=%d` in a systemd unit, `docker run '
        '--ulimit nofile=%d`; or reach the hosts through relays (via=), which hold their pipes.'
        % (what, hosts, want, FDS_PER_PROCESS, min(hosts, max_connect) * FDS_PER_CONNECTING,
           in_use, limit, _show(soft), _show(hard), suggestion, suggestion, suggestion,
           suggestion),
        limit=limit, needed=want, hosts=hosts)


def _show(value):
    try:
        import resource
        if value == resource.RLIM_INFINITY:
            return 'unlimited'
    except ImportError:
        pass
    return str(value)

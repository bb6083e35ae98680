"""Shell commands on hosts: ``tunnel.run('uname -r')``, ``group.run('uptime')``.

The controller half (:func:`run`, :class:`CommandResult`) sends one call;
the host half (:func:`run_on_host`) runs the command with the standard
library only (Python 3.6+), served to the host by the import hook.

What a caller may rely on:

- A ``str`` command runs under ``/bin/sh -c``; a list is an argv, no shell.
- The command runs in a process group of its own.  A ``timeout`` kills the
  whole group (SIGKILL) and the command counts as failed: with ``check=True``
  :class:`~chopsticks.errors.CommandTimeout` is raised (a ``CommandFailed``
  and a ``CallTimeout``); with ``check=False`` the result has
  ``timed_out=True`` and ``returncode == -9``.
- A tunnel that closes (or an agent that dies) while commands run kills
  their process groups too: one small watchdog process per agent holds the
  read end of a pipe the agent writes to; its end of file means the agent
  is gone, and it kills every group still registered.
- Interrupting the controller's wait (Ctrl-C: ``KeyboardInterrupt``) kills
  the command's process group too, on every host it was started on, before
  the interrupt goes on (a kill request per host, waited for at most
  :data:`STOP_WAIT` seconds); the tunnel stays open and usable.
- ``stream=True`` shows each line as it comes, on the controller's stderr,
  prefixed with the host (the agent's stderr relay), and still returns the
  whole output.
- ``cwd`` is the directory the command starts in, on the host; a leading
  ``~`` or ``~user`` is the home directory there (of the user the agent runs
  as).  A directory the command cannot start in fails it with status
  :data:`CWD_FAILED` and an error naming the directory.
"""
import itertools
import os
import shlex
import signal
import sys
import threading

from .errors import CommandFailed, CommandTimeout

__all__ = ['CommandResult', 'CommandFailed', 'CommandTimeout', 'run', 'run_group',
           'run_on_host']

# Lines of stderr an exception message carries (all of it stays on .result).
STDERR_TAIL_LINES = 10
# After a timeout's SIGKILL, how long to wait for the pipes to close: a
# process that left the group (setsid) may hold them open for ever.
DRAIN_AFTER_KILL = 2.0
# The call on the controller waits this long beyond the command's own
# timeout before giving up on the host (a dead host never hangs the caller).
CALL_GRACE = 30.0
# After a Ctrl-C, how long the controller waits for the hosts to confirm that
# they killed the command: a host that does not answer does not hold up the
# interrupt for longer (its agent's watchdog kills it when the tunnel closes).
STOP_WAIT = 2.0
# The status of a command that could not start in its ``cwd``: as ``env -C``
# exits when it cannot change directory, so that it is told apart from the
# command's own statuses and from 126/127 (a command not executable, not found).
CWD_FAILED = 125

# Names a command for stop_on_host (unique within a controller process).
_command_keys = itertools.count(1)
# The default of run_group's ``timeout``: the group's own.
_GROUP_TIMEOUT = object()


# --- the controller half ---------------------------------------------------------------

class CommandResult(object):
    """What a command did on one host.

    ``host``, ``command`` (as text), ``returncode`` (negative: killed by that
    signal), ``stdout``, ``stderr`` (``str``, or ``bytes`` with
    ``text=False``), ``timed_out``; ``ok`` is true when it exited 0 in time.
    """

    __slots__ = ('host', 'command', 'returncode', 'stdout', 'stderr', 'timed_out')

    def __init__(self, host, command, returncode, stdout='', stderr='', timed_out=False):
        self.host = host
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out

    @property
    def ok(self):
        """Exited with status 0 before its timeout."""
        return self.returncode == 0 and not self.timed_out

    @property
    def failed(self):
        return not self.ok

    def as_dict(self):
        """A dict of plain values (bytes output decoded with replacement) for JSON."""
        def plain(value):
            if isinstance(value, bytes):
                return value.decode('utf-8', 'replace')
            return value
        return {'host': self.host, 'command': self.command, 'returncode': self.returncode,
                'ok': self.ok, 'timed_out': self.timed_out,
                'stdout': plain(self.stdout), 'stderr': plain(self.stderr)}

    def to_json(self, **kwargs):
        import json
        return json.dumps(self.as_dict(), **kwargs)

    def status(self):
        """'exit 0', 'exit 2', 'killed by SIGTERM', 'timed out after ...'."""
        if self.timed_out:
            return 'timed out (killed)'
        if self.returncode is not None and self.returncode < 0:
            try:
                return 'killed by %s' % signal.Signals(-self.returncode).name
            except ValueError:
                return 'killed by signal %d' % -self.returncode
        return 'exit %s' % self.returncode

    def __repr__(self):
        def short(value):
            text = repr(value)
            return text if len(text) <= 60 else text[:56] + '...' + text[-1]
        return 'CommandResult(host=%r, command=%r, returncode=%r, stdout=%s, stderr=%s%s)' % (
            self.host, self.command, self.returncode, short(self.stdout), short(self.stderr),
            ', timed_out=True' if self.timed_out else '')

    def __str__(self):
        lines = ['[%s] $ %s  (%s)' % (self.host, self.command, self.status())]
        for name in ('stdout', 'stderr'):
            value = getattr(self, name)
            if isinstance(value, bytes):
                value = value.decode('utf-8', 'replace')
            if value:
                lines.append('--- %s' % name)
                lines.append(value.rstrip('\n'))
        return '\n'.join(lines)

    def __eq__(self, other):
        if not isinstance(other, CommandResult):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]  # equal by value, so unhashable


def command_argv(command, shell=None):
    """(argv, text shown in results and errors) for ``command``.

    ``shell``: None (a str goes through ``/bin/sh -c``, a list does not),
    True (always a shell), False (never: a str is split as a shell would),
    or the path of a shell (``'/bin/bash'``).
    """
    if isinstance(command, (bytes, bytearray)):
        command = os.fsdecode(bytes(command))
    if isinstance(command, str):
        shown = command
        if shell is False:
            argv = shlex.split(command)
            if not argv:
                raise ValueError('empty command')
            return argv, shown
    else:
        argv = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in command]
        if not argv:
            raise ValueError('empty command')
        shown = ' '.join(shlex.quote(a) for a in argv)
        if not shell:
            return argv, shown
        command = shown
    program = shell if isinstance(shell, str) else '/bin/sh'
    return [program, '-c', command], shown


def _decode(value, text):
    if value is None:
        value = b''
    return value.decode('utf-8', 'replace') if text else bytes(value)


def make_result(host, shown, raw, text=True):
    """A CommandResult from what :func:`run_on_host` returned."""
    return CommandResult(host, shown, raw['returncode'], _decode(raw['stdout'], text),
                         _decode(raw['stderr'], text), raw.get('timed_out', False))


def failure(result):
    """The CommandFailed (or CommandTimeout) that ``result`` stands for."""
    stderr = result.stderr
    if isinstance(stderr, bytes):
        stderr = stderr.decode('utf-8', 'replace')
    tail = '\n'.join(stderr.rstrip('\n').splitlines()[-STDERR_TAIL_LINES:])
    cls = CommandTimeout if result.timed_out else CommandFailed
    return cls(result.host, result.command, result.returncode, tail, result)


def _host_arguments(command, input, cwd, env, timeout, stream, shell):
    """(text shown, key naming the command on its hosts, run_on_host's arguments)."""
    argv, shown = command_argv(command, shell)
    if isinstance(input, str):
        input = input.encode('utf-8')
    if cwd is not None:
        cwd = os.fspath(cwd)
    if env is not None:
        env = {str(k): str(v) for k, v in env.items()}
    key = next(_command_keys)
    return shown, key, (argv, input, cwd, env, timeout, stream, key)


def _call_timeout(timeout):
    return None if timeout is None else timeout + CALL_GRACE


def run(tunnel, command, check=True, input=None, cwd=None, env=None, timeout=None,
        text=True, stream=False, shell=None):
    """Run ``command`` on ``tunnel``'s host; returns a :class:`CommandResult`.

    ``check`` raises :class:`~chopsticks.errors.CommandFailed` when it
    exits non-zero (and ``CommandTimeout`` after ``timeout`` seconds);
    ``input`` (str or bytes) is its stdin (else ``/dev/null``); ``cwd`` is
    the directory it starts in (``'~/app'``: in the home directory on the
    host); ``env`` is added to the agent's environment; ``text=False`` keeps
    the output as bytes; ``stream`` shows the lines as they come.  Ctrl-C
    while it runs kills it on the host.
    """
    shown, key, args = _host_arguments(command, input, cwd, env, timeout, stream, shell)
    try:
        raw = tunnel.call(run_on_host, *args, timeout=_call_timeout(timeout))
    except KeyboardInterrupt:
        stop_commands([tunnel], key)
        raise
    result = make_result(tunnel.host, shown, raw, text)
    if check and not result.ok:
        raise failure(result)
    return result


def run_group(group, command, check=True, input=None, cwd=None, env=None,
              timeout=_GROUP_TIMEOUT, text=True, stream=False, shell=None):
    """``command`` on every host of ``group`` at once: a GroupResult of
    CommandResult; a host that failed (could not connect, or the command
    failed with ``check=True``) holds an ErrorResult whose ``exception`` is
    the CommandFailed.

    ``timeout`` is the command's on each host, as for :func:`run`; without
    it, the group's own ``timeout`` is the command's (``timeout=None``: no
    timeout at all).
    """
    from .group import ErrorResult, Group, GroupResult
    if timeout is _GROUP_TIMEOUT:
        timeout = group.timeout
    shown, key, args = _host_arguments(command, input, cwd, env, timeout, stream, shell)
    try:
        raw = group.call(run_on_host, *args, timeout=_call_timeout(timeout))
    except KeyboardInterrupt:
        if isinstance(group, Group):  # (a RelayedGroup's far hosts are not ours to call)
            stop_commands(group.tunnels, key)
        raise
    results = GroupResult()
    for host, value in raw.items():
        if not isinstance(value, ErrorResult):
            value = make_result(host, shown, value, text)
            if check and not value.ok:
                value = ErrorResult(host, failure(value))
        results[host] = value
    return results


def stop_commands(tunnels, key):
    """Kill the command ``key`` on each of ``tunnels`` that is connected,
    waiting at most STOP_WAIT seconds in all: best effort, for a Ctrl-C."""
    import time
    asked = []
    for tunnel in tunnels:
        if tunnel.connected:  # an agent that is gone took its commands with it
            try:
                asked.append(tunnel.call_async(stop_on_host, key))
            except Exception:
                pass
    deadline = time.monotonic() + STOP_WAIT
    for future in asked:
        try:
            future.result(max(0.0, deadline - time.monotonic()))
        except Exception:
            future.cancel()


# --- the host half: stdlib only, Python 3.6+ ------------------------------------------------

# The commands running now, by the key the controller gave them, and the keys
# the controller asked to stop before their command started here.
_running = {}  # type: dict
_stopped = set()  # type: set
_running_lock = threading.Lock()

_watchdog = None  # (Popen, write fd) of this agent's watchdog
_watchdog_lock = threading.Lock()

# Runs as its own session, so that the signal that ends the agent's process
# group does not end it too before it has done its work.  A POSIX shell, not
# Python: starting a Python took 9 ms of a host's CPU on each agent's first
# command, the shell under 1.  It reads "+PGID" / "-PGID" lines; at the end
# of its input (the agent is gone) it ends the groups still registered.
WATCHDOG = r'''
groups=" "
while IFS= read -r line; do
    pgid=${line#?}
    case $line in
        +*) groups="$groups$pgid " ;;
        -*) case $groups in
                *" $pgid "*) groups="${groups%% $pgid *} ${groups#* $pgid }" ;;
            esac ;;
    esac
done
[ "$groups" = " " ] && exit 0
PATH=/bin:/usr/bin:$PATH  # sleep is no builtin of dash
for pgid in $groups; do kill -s TERM -- "-$pgid" 2>/dev/null; done
sleep 1
for pgid in $groups; do kill -s KILL -- "-$pgid" 2>/dev/null; done
'''


def _watch(pgid, sign):
    """Tell the watchdog to kill ``pgid`` if this process dies (``b'+'``), or not (``b'-'``)."""
    global _watchdog
    import subprocess
    with _watchdog_lock:
        if _watchdog is None or _watchdog[0].poll() is not None:
            if sign == b'-':
                return
            # The agent's fd 0 is /dev/null; the pipe's write end is not
            # inheritable, so commands never hold it open.
            read_end, write_end = os.pipe()
            try:
                proc = subprocess.Popen(
                    ['/bin/sh', '-c', WATCHDOG], stdin=read_end,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                    start_new_session=True)
            finally:
                os.close(read_end)
            _watchdog = (proc, write_end)
        try:
            os.write(_watchdog[1], sign + str(pgid).encode() + b'\n')
        except OSError:
            pass


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def stop_on_host(key):
    """Kill the process group of the command that ``run_on_host`` runs
    under ``key`` (or, if it has not started yet, keep it from starting)."""
    with _running_lock:
        proc = _running.get(key)
        if proc is None:
            _stopped.add(key)
            return False
    _kill_group(proc)
    return True


def _not_started(status, message):
    return {'returncode': status, 'stdout': b'', 'stderr': message.encode('utf-8', 'replace'),
            'timed_out': False}


def run_on_host(argv, input=None, cwd=None, env=None, timeout=None, stream=False, key=None):
    """Run ``argv`` here; {'returncode', 'stdout', 'stderr', 'timed_out'}.
    ``key`` names it for :func:`stop_on_host`."""
    import selectors
    import subprocess
    import time
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    given_cwd = cwd
    if cwd is not None:
        cwd = os.path.expanduser(cwd)  # only a leading ~ or ~user
    with _running_lock:
        if key in _stopped:  # interrupted before it started here
            _stopped.discard(key)
            return _not_started(-int(signal.SIGKILL), 'interrupted before it started\n')
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=full_env, close_fds=True, start_new_session=True,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        # Popen names the directory when the child's chdir failed, the program otherwise.
        if cwd is not None and e.filename == cwd and argv[0] != cwd:
            where = repr(given_cwd) if given_cwd == cwd else '%r (%s)' % (given_cwd, cwd)
            return _not_started(CWD_FAILED, 'cannot change to directory %s: %s\n' % (where, reason))
        # As a shell would say it: the command could not start.
        return _not_started(127 if not isinstance(e, PermissionError) else 126,
                            '%s: %s\n' % (argv[0], reason))
    with _running_lock:
        if key is not None:
            _running[key] = proc
            if key in _stopped:  # interrupted while it started
                _stopped.discard(key)
                _kill_group(proc)
    _watch(proc.pid, b'+')
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks = {out_fd: [], err_fd: []}
    try:
        if input is not None:
            feeder = threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True)
            feeder.start()
        partial = {fd: b'' for fd in chunks}
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        selector = selectors.DefaultSelector()
        for pipe in (proc.stdout, proc.stderr):
            selector.register(pipe, selectors.EVENT_READ)
        open_pipes = 2
        while open_pipes:
            wait = None
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    if timed_out:
                        break  # the pipes stayed open after the kill: stop reading
                    timed_out = True
                    _kill_group(proc)
                    deadline = time.monotonic() + DRAIN_AFTER_KILL
                    continue
            for key, _ in selector.select(wait):
                fd = key.fileobj.fileno()
                data = os.read(fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    open_pipes -= 1
                    if stream and partial[fd]:
                        _show(partial[fd])
                    continue
                chunks[fd].append(data)
                if stream:
                    lines = (partial[fd] + data).split(b'\n')
                    partial[fd] = lines.pop()
                    for line in lines:
                        _show(line)
        selector.close()
        if timed_out:
            _kill_group(proc)
        returncode = proc.wait()
    finally:
        if proc.returncode is None:  # interrupted: leave nothing behind
            _kill_group(proc)
            proc.wait()
        with _running_lock:
            _running.pop(key, None)
        _watch(proc.pid, b'-')
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
    return {'returncode': returncode, 'stdout': b''.join(chunks[out_fd]),
            'stderr': b''.join(chunks[err_fd]), 'timed_out': timed_out}


def _feed(pipe, data):
    try:
        pipe.write(data)
    except OSError:
        pass  # the command did not read it all
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _show(line):
    # The agent's stderr reaches the controller, which prefixes the host.
    sys.stderr.write(line.decode('utf-8', 'replace') + '\n')

"""Becoming another user: the password dialogue of ``sudo``, and wrapping a
tunnel so that its agent runs as another user.

``Sudo(user, password=...)`` runs ``sudo -S -p PROMPT -k -H -u USER -- /bin/sh
-c 'printf MARK >&2; exec "$@"' sh PYTHON...``.  sudo writes PROMPT (a
random token) on stderr when it wants the password and reads it from stdin;
once it lets the command through, the shell writes MARK.  The transport
watches stderr for the two, writes the password (and nothing else) when
PROMPT comes, and lets the bootstrap go only after MARK, so the password
and the agent never mix whatever sudo decides (NOPASSWD, cached
credentials, a lecture first).  A second PROMPT means a wrong password: the
process is killed and ConnectError says so at once.

The password never appears in argv, the environment, a log, an exception
message or chopsticks' cache.  Through ``via=``, the password travels (once
resolved) inside the tunnel's description to the relay, which runs the same
dialogue there.

This module runs on relay hosts too: stdlib only, Python 3.6+.
"""
import os
import time

from .errors import ConnectError

__all__ = ['BecomeTunnel', 'PasswordTransport', 'become', 'resolve_password',
           'needs_password_message']

# sudo's messages (in English; a second prompt is what counts) that mean "the
# password was wrong" or "a password is needed and none was given".
WRONG_PASSWORD = (b'Sorry, try again', b'incorrect password', b'Authentication failure')
PASSWORD_REQUIRED = ('a password is required', 'a terminal is required',
                     'no tty present and no askpass program specified')
POLL_INTERVAL = 0.005  # seconds between looks at the stderr read so far


def resolve_password(password):
    """The password as bytes (a callable is called now), or None."""
    if callable(password):
        password = password()
    if password is None:
        return None
    if isinstance(password, str):
        password = password.encode('utf-8')
    if b'\n' in password or b'\r' in password:
        raise ValueError('a password cannot hold a line break')
    return bytes(password)


def needs_password_message(method, user, stderr):
    """The message of a ConnectError for a become that wanted a password and
    had none, or None when ``stderr`` says something else."""
    if any(text in stderr for text in PASSWORD_REQUIRED):
        return ('%s to %s needs a password: pass password= (a str, or a callable asked '
                'once), or -K on the command line' % (method, user))
    return None


def new_token():
    return 'chopsticks-%s' % os.urandom(8).hex()


def _make_password_transport():
    from .transport import ProcessTransport

    class PasswordTransport(ProcessTransport):
        """A process transport that answers sudo's password prompt before the
        bootstrap goes out (see the module's docstring)."""

        def __init__(self, argv, password, prompt, mark, method, user, timeout, what=None):
            # ``password``: a function giving it, called when sudo asks.
            super().__init__(argv, what=what)
            self._password = password  # a callable or bytes: resolved when sudo asks
            self._prompt = prompt.encode()
            self._mark = mark.encode()
            self._method = method
            self._user = user
            self._timeout = timeout

        def start(self, conn):
            super().start(conn)
            try:
                self._answer(conn)
            except BaseException:
                conn.close()
                raise

        def _answer(self, conn):
            deadline = time.monotonic() + self._timeout
            asked = 0
            while True:
                seen = bytes(conn.output.tail)
                if self._mark in seen:
                    self._forget(conn)
                    return
                prompts = seen.count(self._prompt)
                if prompts > 1 or (asked and any(w in seen for w in WRONG_PASSWORD)):
                    raise ConnectError(conn.host, '%s to %s: the password was refused (wrong '
                                       'password)' % (self._method, self._user),
                                       self._clean(seen))
                if prompts == 1 and not asked:
                    password = self._password()
                    if password is None:
                        raise ConnectError(conn.host, needs_password_message(
                            self._method, self._user, 'a password is required'),
                            self._clean(seen))
                    asked = 1
                    with conn.write_lock:
                        self.write([password + b'\n'])
                    del password
                if conn.closed or (self.proc is not None and self.proc.poll() is not None
                                   and self._mark not in bytes(conn.output.tail)):
                    time.sleep(0.05)  # the rest of its stderr
                    seen = bytes(conn.output.tail)
                    if self._mark in seen:
                        continue
                    text = self._clean(seen)
                    reason = needs_password_message(self._method, self._user, text) or \
                        '%s exited before the agent started' % self._method
                    raise ConnectError(conn.host, reason, text)
                if time.monotonic() > deadline:
                    raise ConnectError(conn.host, '%s gave no answer within %ss'
                                       % (self._method, self._timeout), self._clean(seen))
                time.sleep(POLL_INTERVAL)

        def _clean(self, seen):
            text = seen.replace(self._prompt, b'').replace(self._mark, b'')
            return text.decode('utf-8', 'replace')

        def _forget(self, conn):
            """Take the prompt and the mark out of the stderr a later error shows."""
            tail = conn.output.tail
            for token in (self._mark, self._prompt):
                at = tail.find(token)
                while at >= 0:
                    del tail[at:at + len(token)]
                    at = tail.find(token)
            self._password = None

    return PasswordTransport


_password_transport = None


def PasswordTransport(*args, **kwargs):
    """A :class:`~chopsticks.transport.ProcessTransport` that answers a password prompt."""
    global _password_transport
    if _password_transport is None:
        _password_transport = _make_password_transport()
    return _password_transport(*args, **kwargs)


class BecomeTunnel(object):
    """What Sudo, Su and Doas share: a password (or a callable giving it,
    called once, when the prompt comes) and the errors that name the need
    for one.  Mixed in ahead of SubprocessTunnel."""

    method = 'sudo'
    accepts_password = True

    def _init_become(self, user, password):
        if password is not None and not self.accepts_password:
            raise ValueError('%s:// cannot take a password: %s reads it from a terminal, and '
                             'chopsticks gives it none (use sudo with password=, or %s without '
                             'a password prompt)' % (self.method, self.method, self.method))
        self.user = user
        self._password = password

    def offer_password(self, password):
        """Use ``password`` if this tunnel was given none (the CLI's -K)."""
        if self._password is None and self.accepts_password:
            self._password = password

    def _password_once(self):
        """The password, asked for (if a callable) at most once per tunnel."""
        password = self._password
        if callable(password):
            password = self._password = resolve_password(password)
        return resolve_password(password)

    def relay_spec(self):
        """The relay rebuilds this tunnel: it gets the password itself, not a callable."""
        cls, args, kwargs = super().relay_spec()
        if self._password is None:
            return cls, args, kwargs
        return cls, args[:3], dict(kwargs, password=self._password_once())

    def become_argv(self, prompt):
        """The command before the python command line; ``prompt`` is None without a password."""
        raise NotImplementedError

    def argv(self):
        return self.become_argv(None) + self.python_args()

    def transport(self):
        from .transport import ProcessTransport
        python = self.python_args()
        if self._password is None:
            argv = self.become_argv(None)
            return ProcessTransport(argv + python, what=' '.join(argv + python[:1]))
        prompt, mark = new_token(), new_token()
        argv = self.become_argv(prompt)
        # The shell says MARK once sudo let it run; "$@" is the python command.
        shell = ['/bin/sh', '-c', 'printf %s >&2; exec "$@"' % mark, 'sh']
        shown = [a if a != prompt else "''" for a in argv]
        return PasswordTransport(argv + shell + python, self._password_once, prompt, mark,
                                 self.method, self.user, self.connect_timeout,
                                 what=' '.join(shown + python[:1]))

    def open_connection(self, first_call=None):
        try:
            return super().open_connection(first_call)
        except ConnectError as e:
            message = needs_password_message(self.method, self.user, e.stderr) \
                if self._password is None else None
            if message is None:
                raise
            raise ConnectError(self.host, message, e.stderr) from None


def become(tunnel, user='root', password=None, method='sudo', name=None):
    """A tunnel that runs as ``user`` on ``tunnel``'s host, named ``name``
    (default: like ``tunnel``).

    A :class:`~chopsticks.Local` becomes a local ``Sudo`` (or Su, Doas);
    any other tunnel is the ``via`` of the new one, so sudo runs on its host.
    """
    from . import tunnel as tunnels
    cls = {'sudo': tunnels.Sudo, 'su': tunnels.Su, 'doas': tunnels.Doas}[method]
    name = name or tunnel.host
    if isinstance(tunnel, tunnels.Local) and tunnel.via is None:
        return cls(user, name=name, python=tunnel.python, password=password)
    return cls(user, name=name, python=tunnel.python, password=password, via=tunnel)


def sudo_tunnel(address, **options):
    """``sudo://[user]`` (default root): :class:`chopsticks.Sudo`."""
    from .tunnel import Sudo
    return Sudo(address or 'root', **options)


def su_tunnel(address, **options):
    """``su://[user]`` (default root): :class:`chopsticks.Su`."""
    from .tunnel import Su
    return Su(address or 'root', **options)


def doas_tunnel(address, **options):
    """``doas://[user]`` (default root): :class:`chopsticks.Doas`."""
    from .tunnel import Doas
    return Doas(address or 'root', **options)

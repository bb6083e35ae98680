"""Running the host's tools, and the one error the system tasks raise.

Runs on the host: standard library only, Python 3.6+.
"""
import os
import subprocess

#: Lines of a failed command's stderr quoted in the error.
STDERR_TAIL_LINES = 15


class TaskError(Exception):
    """A system task was given bad input, or a command it ran failed.

    The message names the task, the argument and its value
    (``"user: group='nosuch': no such group"``); chopsticks adds the host
    when it hands the error to the controller.  A password hash is never
    part of a message.
    """


TaskError.__module__ = "chopsticks_system"  # its public home, so errors read chopsticks_system.TaskError


def bad(task, argument, value, problem):
    """The TaskError for one bad argument."""
    return TaskError("%s: %s=%r: %s" % (task, argument, value, problem))


class Command(object):
    """What one command printed and how it exited."""

    def __init__(self, argv, returncode, out, err):
        self.argv = argv
        self.returncode = returncode
        self.out = out
        self.err = err


def run(argv, task, argument, value, ok_codes=(0,), stdin=None, secrets=()):
    """Run ``argv`` in the C locale; a TaskError naming ``task``, ``argument`` and
    ``value`` when it cannot start or exits with a status outside ``ok_codes``
    (``None``: any status is fine).  ``secrets`` are blanked from the error."""
    env = dict(os.environ, LC_ALL="C", LANG="C")
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                universal_newlines=True, env=env)
    except OSError as exc:
        raise bad(task, argument, value, "cannot run %s: %s" % (argv[0], exc.strerror or exc))
    out, err = proc.communicate(stdin)
    if ok_codes is not None and proc.returncode not in ok_codes:
        tail = "\n".join((err.strip() or out.strip()).splitlines()[-STDERR_TAIL_LINES:])
        for secret in secrets:
            if secret:
                tail = tail.replace(secret, "<hidden>")
        raise bad(task, argument, value, "`%s` failed with exit status %d%s" % (
            " ".join(argv), proc.returncode, (":\n" + tail) if tail else ""))
    return Command(argv, proc.returncode, out, err)

"""What processes cost, read from /proc: the bench tools' one copy."""
import os


def cpu_seconds(pids):
    """Seconds on CPU of every thread of ``pids`` (schedstat: nanoseconds,
    not 10 ms ticks); a process or thread that ended meanwhile counts 0."""
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir('/proc/%d/task' % pid):
                with open('/proc/%d/task/%s/schedstat' % (pid, tid)) as f:
                    total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


def parent(pid):
    """The parent of process ``pid`` (OSError if it is gone)."""
    with open('/proc/%d/stat' % pid) as f:
        text = f.read()
    return int(text[text.rindex(')') + 2:].split()[1])


def comm(pid):
    """The command name of process ``pid`` (OSError if it is gone)."""
    with open('/proc/%d/comm' % pid) as f:
        return f.read().strip()

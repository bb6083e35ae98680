"""What a relay runs for bench/tools/thousand.py: one call carrying a whole group.

Served to the relay by the controller's import hook, like any user module;
the relay serves it on to its hosts in turn.
"""
_groups = {}


def group_call(count, python, fn, *args):
    """Call ``fn(*args)`` on ``count`` Local hosts of this relay (connected on
    the first call, kept for the next); returns {host: value or error text}."""
    from chopsticks.group import Group
    from chopsticks.tunnel import Local
    group = _groups.get(count)
    if group is None:
        group = _groups[count] = Group([Local('far%d' % i, python=python) for i in range(count)],
                                       progress=False)
    result = group.call(fn, *args)
    return {host: (str(value) if type(value).__name__ == 'ErrorResult' else value)
            for host, value in result.items()}


def close_groups():
    for group in _groups.values():
        group.close()
    _groups.clear()

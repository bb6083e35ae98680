"""Functions the RelayedGroup tests call on far hosts and relays.

stdlib-only and Python 3.6: served through the relay's import hook.
"""
import os
import sys
import time


def host_name():
    """The name the controller gave this host's tunnel."""
    return sys.modules['_chopsticks_agent'].agent.config['host']


def pid_and_name():
    return os.getpid(), host_name()


def fail_on(name, value):
    if host_name() == name:
        raise KeyError('no %s here' % value)
    return value


def hang_on(name, seconds):
    if host_name() == name:
        time.sleep(seconds)
    return host_name()


class Unsendable(object):
    pass


PICKLE = b'\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.'


def make_hostile(kind):
    """Replace this relay's relay_group_run by one whose reply is crafted."""
    import chopsticks.relay

    def crafted(key, setup, payload, what, timeout):
        if kind == 'unsendable':
            return ('ok', [Unsendable()], {})
        if kind == 'hang':
            time.sleep(60)
        # a, b, c have values (b and c fail too); d none; e a failure of a
        # class a relay may not name; entries for hosts that are not there
        return ('ok', [PICKLE, 0, 0], {1: ('remote',), 2: 'junk', 4: ('error', 'CommandFailed', 'made up'),
                                       'intruder': ('ok', 1), 7: ('ok', 2)})
    chopsticks.relay.relay_group_run = crafted
    return True


def version():
    return tuple(sys.version_info[:2])

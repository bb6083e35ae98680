"""chopsticks: call plain Python functions on many hosts.

    from chopsticks import Tunnel
    Tunnel('web1').call(time.time)
"""
from .errors import (
    CallTimeout, ChopsticksError, CommandFailed, CommandTimeout, ConnectError,
    DepthLimitExceeded, ProtocolError, RemoteException, TunnelClosed,
)

__version__ = '2.0.0'

__all__ = [
    'Tunnel', 'SSHTunnel', 'Local', 'Sudo', 'Docker', 'SubprocessTunnel', 'BaseTunnel',
    'ChopsticksError', 'RemoteException', 'ConnectError', 'TunnelClosed', 'CallTimeout',
    'ProtocolError', 'DepthLimitExceeded', 'hookimpl',
    'Group', 'GroupResult', 'ErrorResult', 'RelayedGroup', 'Queue', 'AsyncResult',
    'CommandResult', 'CommandFailed', 'CommandTimeout', 'Su', 'Doas', 'inventory',
]

# Imported on first use.  Hosts import this package too (for chopsticks.files,
# say), and the import hook sends a module with everything its top level
# imports: the tunnels here would bring the controller's whole core with
# them, 150 ms before a first put could start.  (A Python 3.6 host, which
# has no module __getattr__, imports them from chopsticks.tunnel.)
_LAZY = {
    'Tunnel': 'tunnel', 'SSHTunnel': 'tunnel', 'Local': 'tunnel', 'Sudo': 'tunnel',
    'Docker': 'tunnel', 'SubprocessTunnel': 'tunnel', 'BaseTunnel': 'tunnel',
    'Group': 'group', 'GroupResult': 'group', 'ErrorResult': 'group',
    'RelayedGroup': 'relaygroup',
    'Queue': 'queue', 'AsyncResult': 'queue',
    'CommandResult': 'shell', 'Su': 'tunnel', 'Doas': 'tunnel',
    'hookimpl': 'hookspecs',  # pluggy: not something a remote (maybe Python 3.6) should import
}


def __getattr__(name):
    if name == 'inventory':  # a module: chopsticks.inventory.load(path)
        import importlib
        return importlib.import_module('.inventory', __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError('module %r has no attribute %r' % (__name__, name))
    import importlib
    value = getattr(importlib.import_module('.' + module, __name__), name)
    globals()[name] = value
    return value

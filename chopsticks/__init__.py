"""chopsticks: call plain Python functions on many hosts.

    from chopsticks import Tunnel
    Tunnel('web1').call(time.time)
"""
from .errors import (
    CallTimeout, ChopsticksError, ConnectError, DepthLimitExceeded, ProtocolError,
    RemoteException, TunnelClosed,
)
from .hookspecs import hookimpl
from .tunnel import BaseTunnel, Docker, Local, SSHTunnel, SubprocessTunnel, Sudo, Tunnel

__version__ = '2.0.0.dev0'

__all__ = [
    'Tunnel', 'SSHTunnel', 'Local', 'Sudo', 'Docker', 'SubprocessTunnel', 'BaseTunnel',
    'ChopsticksError', 'RemoteException', 'ConnectError', 'TunnelClosed', 'CallTimeout',
    'ProtocolError', 'DepthLimitExceeded', 'hookimpl',
]

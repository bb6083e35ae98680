"""Run Python functions on a host: a local subprocess, or any SSH host you name.

    python examples/quickstart.py            # a Local tunnel: no SSH server needed
    python examples/quickstart.py web1 web2  # ssh_config aliases or host names
"""
import platform
import sys
import time

from chopsticks import Local, RemoteException, Tunnel


def describe_host():
    # Runs on the host: a plain function, shipped as source because it lives in __main__.
    import os
    return {
        'hostname': platform.node(),
        'python': platform.python_version(),
        'pid': os.getpid(),
        'load': os.getloadavg(),
    }


def main(hosts):
    tunnels = [Tunnel(host) for host in hosts] or [Local()]
    for tunnel in tunnels:
        start = time.perf_counter()
        with tunnel:
            info = tunnel.call(describe_host)
            connected = time.perf_counter() - start
            print('%s: %s (connected and called in %.0f ms)' % (tunnel.host, info, connected * 1000))
            print('  remote clock:', tunnel.call(time.time))
            print('  a lambda:', tunnel.call(lambda x: x * 2, b'chop'))
            try:
                tunnel.call(int, 'not a number')
            except RemoteException as e:
                print('  remote error came back as %s: %s' % (e.type_name, e.msg))


if __name__ == '__main__':
    main(sys.argv[1:])

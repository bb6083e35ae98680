"""A group too big for the open-files limit fails before it connects anything.

Each run happens in a subprocess that lowers its own RLIMIT_NOFILE (soft and
hard) before making the group, as a user's shell with ``ulimit -n 256`` would.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from chopsticks.errors import ChopsticksError, FileLimitError
from chopsticks.fdlimit import FDS_PER_PROCESS, descriptors_needed
from chopsticks.tunnel import Local

resource = pytest.importorskip('resource')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json, os, resource, sys
    limit, hosts, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    from chopsticks.group import Group
    from chopsticks.queue import Queue
    from chopsticks.tunnel import Local

    def children():
        with open('/proc/self/task/%d/children' % os.getpid()) as f:
            return len(f.read().split())

    tunnels = [Local('h%d' % i) for i in range(hosts)]
    out = {}
    try:
        if how == 'group':
            result = Group(tunnels, progress=False).call(os.getpid)
            out['ok'] = sum(1 for _ in result.successful())
            out['failed'] = [str(e) for _, e in result.failures()]
        else:
            queue = Queue()
            results = [queue.call(t, os.getpid) for t in tunnels]
            queue.run()
            out['ok'] = sum(1 for r in results if isinstance(r.value, int))
    except Exception as e:
        out['error'] = [type(e).__name__, str(e), getattr(e, 'limit', None),
                        getattr(e, 'hosts', None)]
    out['connected'] = sum(t.connected for t in tunnels)
    out['children'] = children()
    for t in tunnels:
        t.close()
    print(json.dumps(out))
''')


def run_limited(limit, hosts, how='group'):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, '-c', SCRIPT, str(limit), str(hosts), how],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


@pytest.mark.parametrize('how', ['group', 'queue'])
def test_a_group_past_the_hard_limit_fails_up_front_naming_the_limit(how):
    out = run_limited(256, 120, how)
    assert 'error' in out, out
    name, message, limit, hosts = out['error']
    assert name == 'FileLimitError'
    assert limit == 256 and hosts == 120
    assert '120 hosts' in message and 'RLIMIT_NOFILE' in message and '256' in message
    assert 'ulimit -Hn' in message and 'LimitNOFILE' in message and 'limits.conf' in message
    assert ('getpid' if how == 'group' else 'queue') in message  # what was attempted
    # Nothing was started: no host connected, no child process.
    assert out['connected'] == 0 and out['children'] == 0


def test_a_group_that_fits_under_the_same_limit_connects_every_host():
    out = run_limited(256, 30)
    assert out.get('error') is None, out
    assert out['ok'] == 30 and out['failed'] == []


def test_the_error_is_a_chopsticks_error_and_an_oserror():
    assert issubclass(FileLimitError, ChopsticksError) and issubclass(FileLimitError, OSError)


def test_connected_and_relayed_tunnels_need_no_new_descriptors():
    relay = Local('relay')
    relayed = [Local('far%d' % i, via=relay) for i in range(50)]
    # Fifty tunnels through one relay: the relay's three pipes, once.
    needed, hosts = descriptors_needed(relayed, 16)
    assert hosts == 1 and needed >= FDS_PER_PROCESS
    with Local('near') as near:
        assert descriptors_needed([near], 16) == (0, 0)

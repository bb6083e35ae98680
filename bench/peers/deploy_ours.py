"""A deployment as a chopsticks user runs it: a fresh process, one call per host.

``python deploy_ours.py tasks|hand SPEC.json`` connects to every host of
the spec, sends :func:`deploy_fns.deploy_tasks` (chopsticks' tasks) or
:func:`deploy_fns.deploy_hand` (the same steps by hand) once to each through
a :class:`chopsticks.Queue` (each host gets its own directory), and prints
``{host: [operations changed]}`` as JSON.  The bench times the whole process,
as it times ``pyinfra`` and ``ansible-playbook``.
"""
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
try:
    import chopsticks_files  # noqa: F401
    import chopsticks_pkg  # noqa: F401
except ImportError:  # the plugins are not installed in this interpreter: use the checkout's
    sys.path[1:1] = sorted(glob.glob(os.path.join(REPO, 'plugins', '*', 'src')))

from chopsticks import Tunnel  # noqa: E402
from chopsticks.queue import Queue  # noqa: E402

import deploy_fns  # noqa: E402


def main():
    mode, spec_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    fn = {'tasks': deploy_fns.deploy_tasks, 'hand': deploy_fns.deploy_hand}[mode]
    queue = Queue(progress=False)
    tunnels = [Tunnel(host, ssh_config=spec['ssh_config'], python=spec['remote_python'])
               for host in spec['hosts']]
    results = {t.host: queue.call(t, fn, deploy_fns.app_dir(spec['root'], t.host))
               for t in tunnels}
    try:
        queue.run()
    finally:
        for t in tunnels:
            t.close()
    out, failed = {}, []
    for host, result in results.items():
        if result.error is not None:
            failed.append(str(result.error))
            if result.error.tb:
                sys.stderr.write(result.error.tb)
        else:
            out[host] = result.value
    if failed:
        sys.exit('%d hosts failed; %s' % (len(failed), failed[0]))
    print(json.dumps(out))


if __name__ == '__main__':
    main()

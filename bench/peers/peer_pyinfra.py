"""The pyinfra column of the whole-deployment rows (runs in bench/.env-peers).

Writes an inventory (the bench's ssh aliases, read from the same ssh_config
every column uses: paramiko takes the port, user, key and known_hosts file
from it) and a deploy file of the five operations (``deploy_fns``), then runs
``pyinfra -y --parallel N`` once per run, as a user would.
"""
import os
import re
import sys

import _harness as h

import deploy_fns

DEPLOY = '''\
import io

from pyinfra import host
from pyinfra.operations import apt, files, server

ROOT = {root!r}
directory = ROOT + '/' + host.name + '/app'
files.directory(name='directory', path=directory, mode='755')
files.put(name='file', src=io.StringIO({content!r}), dest=directory + '/app.conf', mode='644')
files.line(name='line', path=directory + '/hosts', line={match!r}, replace={line!r})
server.shell(name='command', commands=[{command!r}.format(dir=directory)])
apt.packages(name='package', packages=[{package!r}], present=True, update=False)
'''

INVENTORY = '''\
hosts = ({hosts!r}, {{'ssh_config_file': {ssh_config!r}}})
'''


def _pyinfra():
    return os.path.join(os.path.dirname(sys.executable), 'pyinfra')


def _changed(output, hosts):
    """``{host: operations changed}`` from pyinfra's log of the run.

    pyinfra 3 prints ``[host1] Success`` under each operation that changed
    something on that host, ``[host1] No changes`` under one that did not.
    """
    changed = {host: 0 for host in hosts}
    for match in re.finditer(r'^\s*\[(\S+)\]\s+Success\s*$', output, re.M):
        if match.group(1) in changed:
            changed[match.group(1)] += 1
    return changed


def _deploy(ctx, task):
    workdir = os.path.join(ctx.scratch, 'pyinfra')
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, 'pyinfra.log')

    def run_once(hosts, root):
        with open(os.path.join(workdir, 'inventory.py'), 'w') as f:
            f.write(INVENTORY.format(hosts=list(hosts), ssh_config=ctx.ssh_config))
        with open(os.path.join(workdir, 'deploy.py'), 'w') as f:
            f.write(DEPLOY.format(root=root, content=deploy_fns.CONTENT, match=deploy_fns.MATCH,
                                  line=deploy_fns.LINE, command=deploy_fns.COMMAND,
                                  package=deploy_fns.PACKAGE))
        start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        h.run_logged([_pyinfra(), '-y', '--parallel', str(len(hosts)), 'inventory.py', 'deploy.py'],
                     log_path, cwd=workdir)
        with open(log_path) as f:
            f.seek(start)
            return _changed(f.read(), hosts)

    rows = h.deploy_rows(ctx, task, run_once)
    for result in rows.values():
        result.note = 'pyinfra -y --parallel N, %s' % result.note
    return rows


def deploy(ctx):
    return _deploy(ctx, 'deploy')


def deploy_many(ctx):
    return _deploy(ctx, 'deploy_many')


if __name__ == '__main__':
    h.main(globals())

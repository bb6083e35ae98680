"""The Ansible column of the whole-deployment rows (runs in bench/.env-peers).

Writes a playbook of the five operations (``deploy_fns``: ``file``,
``copy``, ``lineinfile``, ``command``, ``apt``) and an INI inventory of the
bench's ssh aliases, then runs ``ansible-playbook -f N`` once per run, as a
user would, with the settings a user after speed takes from Ansible's
documentation: pipelining on, no fact gathering (no task here needs facts),
OpenSSH's connection sharing as Ansible configures it (``ControlPersist``:
the tasks of one run share a connection per host).  Each run starts
without connections: the masters a run leaves are stopped after it.
"""
import glob
import json
import os
import re
import subprocess
import sys

import _harness as h

import deploy_fns


def _playbook():
    """JSON is YAML: the playbook without a YAML writer in this environment."""
    app = '{{ root }}/{{ inventory_hostname }}/app'
    return [{
        'hosts': 'all',
        'gather_facts': False,
        'tasks': [
            {'name': 'directory', 'ansible.builtin.file': {'path': app, 'state': 'directory',
                                                           'mode': '0755'}},
            {'name': 'file', 'ansible.builtin.copy': {'dest': app + '/app.conf',
                                                      'content': '{{ content }}', 'mode': '0644'}},
            {'name': 'line', 'ansible.builtin.lineinfile': {
                'path': app + '/hosts', 'line': '{{ line }}', 'regexp': '{{ match }}',
                'create': True}},
            {'name': 'command', 'ansible.builtin.command': deploy_fns.COMMAND.format(dir=app)},
            {'name': 'package', 'ansible.builtin.apt': {'name': deploy_fns.PACKAGE,
                                                        'state': 'present', 'update_cache': False}},
        ],
    }]


def _changed(output, hosts):
    """``{host: changed}`` from the PLAY RECAP (``host1 : ok=5 changed=4 ...``)."""
    changed = {}
    for match in re.finditer(r'^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)', output, re.M):
        if match.group(1) in hosts:
            changed[match.group(1)] = int(match.group(2))
    return changed


def _stop_masters(control_dir):
    for socket in glob.glob(os.path.join(control_dir, '*')):
        subprocess.run(['ssh', '-o', 'ControlPath=' + socket, '-O', 'exit', 'bench'],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _deploy(ctx, task):
    workdir = os.path.join(ctx.scratch, 'ansible')
    control_dir = os.path.join(workdir, 'cp')
    os.makedirs(control_dir, exist_ok=True)
    log_path = os.path.join(workdir, 'ansible.log')
    with open(os.path.join(workdir, 'playbook.yml'), 'w') as f:
        json.dump(_playbook(), f, indent=1)
    config = os.path.join(workdir, 'ansible.cfg')  # the settings below, not this user's
    with open(config, 'w') as f:
        f.write('[defaults]\n')
    env = dict(os.environ, ANSIBLE_HOME=os.path.join(workdir, 'home'),
               ANSIBLE_LOCAL_TEMP=os.path.join(workdir, 'tmp'),
               ANSIBLE_SSH_CONTROL_PATH_DIR=control_dir,
               ANSIBLE_HOST_KEY_CHECKING='False', ANSIBLE_PIPELINING='True',
               ANSIBLE_RETRY_FILES_ENABLED='False', ANSIBLE_NOCOLOR='1',
               ANSIBLE_DEPRECATION_WARNINGS='False', ANSIBLE_CONFIG=config)
    playbook = os.path.join(os.path.dirname(sys.executable), 'ansible-playbook')

    def run_once(hosts, root):
        with open(os.path.join(workdir, 'inventory.ini'), 'w') as f:
            f.write('[all]\n%s\n\n[all:vars]\n' % '\n'.join(hosts))
            f.write('ansible_ssh_common_args=-F %s\n' % ctx.ssh_config)
            f.write('ansible_python_interpreter=%s\n' % ctx.remote_python)
        with open(os.path.join(workdir, 'vars.json'), 'w') as f:
            json.dump({'root': root, 'content': deploy_fns.CONTENT, 'line': deploy_fns.LINE,
                       'match': deploy_fns.MATCH}, f)
        start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        try:
            h.run_logged([playbook, '-i', 'inventory.ini', '-f', str(len(hosts)),
                          '-e', '@vars.json', 'playbook.yml'], log_path, env=env, cwd=workdir)
        finally:
            _stop_masters(control_dir)
        with open(log_path) as f:
            f.seek(start)
            return _changed(f.read(), hosts)

    rows = h.deploy_rows(ctx, task, run_once)
    for result in rows.values():
        result.note = ('ansible-playbook -f N, pipelining, gather_facts: false, %s'
                       % result.note)
    return rows


def deploy(ctx):
    return _deploy(ctx, 'deploy')


def deploy_many(ctx):
    return _deploy(ctx, 'deploy_many')


if __name__ == '__main__':
    h.main(globals())

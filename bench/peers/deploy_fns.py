"""The whole-deployment rows' five operations, as chopsticks sends them to a host.

Every column of the rows (``bench/rows.py``: ``deploy_*``) makes the same
five things true under ``<root>/<host>/``, each host in a directory of its
own on the one loopback machine:

1. the directory ``app`` (mode 0755);
2. the file ``app/app.conf`` with :data:`CONTENT` (mode 0644);
3. the line :data:`LINE` in ``app/hosts`` (replacing a line :data:`MATCH`
   finds, the file created if missing);
4. the command :data:`COMMAND` run (every time: it reports a change each run,
   as Ansible's ``command`` and pyinfra's ``server.shell`` do);
5. the package :data:`PACKAGE` present (installed on every Debian machine, so
   the rows measure the check, never a download).

:func:`deploy_tasks` does it with the tasks of chopsticks' plugins,
:func:`deploy_hand` with the standard library only, as a user would write it
by hand.  Both run on the host: standard library only, Python 3.6+.
"""
import os
import re
import subprocess

CONTENT = ''.join('setting_%02d = value %d  # a line of a small configuration file\n' % (i, i * 7)
                  for i in range(24))
LINE = '10.0.0.5 db'
MATCH = r'\sdb$'
COMMAND = 'wc -l {dir}/app.conf'
PACKAGE = 'coreutils'


def app_dir(root, host):
    return '%s/%s/app' % (root, host)


def run_command(command):
    """The command step, through chopsticks' own host half of ``tunnel.run``
    (``chopsticks.shell.run_on_host``: its own process group, killed by a
    watchdog if the agent dies), as a task: it changed something each run."""
    try:
        from chopsticks.shell import run_on_host
    except ImportError:  # a chopsticks before shell commands (issue 18)
        proc = subprocess.run(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        raw = {'returncode': proc.returncode, 'stdout': proc.stdout, 'stderr': proc.stderr}
    else:
        raw = run_on_host(['/bin/sh', '-c', command])
    if raw['returncode']:
        raise RuntimeError('%r exited with %d: %s' % (command, raw['returncode'],
                                                      raw['stderr'].decode('utf-8', 'replace')))
    return {'changed': True, 'returncode': 0, 'stdout': raw['stdout'].decode('utf-8', 'replace')}


def deploy_tasks(directory_path):
    """The five operations as chopsticks' tasks, in one function (one call per host)."""
    from chopsticks_files import directory, file, line
    from chopsticks_pkg import install

    results = {
        'directory': directory(directory_path, mode='0755'),
        'file': file(directory_path + '/app.conf', CONTENT, mode='0644'),
        'line': line(directory_path + '/hosts', LINE, match=MATCH, create=True),
        'command': run_command(COMMAND.format(dir=directory_path)),
        'package': install(PACKAGE),
    }
    return sorted(name for name, result in results.items() if result['changed'])


def deploy_hand(directory_path):
    """The same five operations written by hand with the standard library."""
    changed = []
    if not os.path.isdir(directory_path):
        os.makedirs(directory_path)
        changed.append('directory')
    if os.stat(directory_path).st_mode & 0o7777 != 0o755:
        os.chmod(directory_path, 0o755)
        if 'directory' not in changed:
            changed.append('directory')

    conf = directory_path + '/app.conf'
    try:
        with open(conf) as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if current != CONTENT:
        _write(conf, CONTENT)
        changed.append('file')
    if os.stat(conf).st_mode & 0o7777 != 0o644:
        os.chmod(conf, 0o644)
        if 'file' not in changed:
            changed.append('file')

    hosts = directory_path + '/hosts'
    try:
        with open(hosts) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    matches = [i for i, text in enumerate(lines) if re.search(MATCH, text)]
    if matches and lines[matches[-1]] != LINE:
        lines[matches[-1]] = LINE
        _write(hosts, '\n'.join(lines) + '\n')
        changed.append('line')
    elif not matches and LINE not in lines:
        _write(hosts, '\n'.join(lines + [LINE]) + '\n')
        changed.append('line')

    subprocess.check_output(COMMAND.format(dir=directory_path), shell=True)
    changed.append('command')

    status = subprocess.run(['dpkg-query', '-W', '-f', '${db:Status-Abbrev}', PACKAGE],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            universal_newlines=True).stdout
    if not status.startswith('ii'):
        subprocess.check_call(['apt-get', 'install', '-y', '-q', PACKAGE])
        changed.append('package')
    return sorted(changed)


def _write(path, text):
    """Atomically: a temp file beside ``path``, renamed over it."""
    temp = '%s.tmp-%d' % (path, os.getpid())
    with open(temp, 'w') as f:
        f.write(text)
    os.rename(temp, path)

"""``python -m bench``: chopsticks side by side with its peers and the floors.

Sets everything up itself (loopback sshd, the peers' virtualenv, a slow-link
ssh_config, test data), runs every row for every column in subprocesses,
and prints a markdown table of medians with ratios to the floor or the best
peer. See bench/RESULTS.md for a run and bench/rows.py to add a row.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from . import fixtures, report
from .fixtures import log
from .rows import COLUMNS, ROWS, ROW_BY_ID, label, measures, tasks_for
from .peers._harness import RESULT_PREFIX

MiB = 1 << 20
NOT_INTERLEAVED = ('memory', 'thousand')  # one long sample; nothing to take turns with
# Short samples, one per turn, {task: turns per --repeat}.  A connect here
# takes 290-320 ms, with one in seven or so at 350-380 ms (the floor's too),
# whatever runs it; ours is about 8 ms above the floor (30 alternated pairs:
# medians 308 and 300 ms), and the medians of five samples a column put it
# anywhere from 0.96x to 1.12x.  Fifteen samples, a turn each, narrow that.
# Round trips vary as much from one process to the next, ours and the
# floor's alike (2,000 calls in each of 12 processes: the floor 42-81 µs,
# ours 64-108 µs, medians 1.29x apart; full-27's five gave 1.54x).
ONE_SAMPLE_PER_TURN = {'connect_call': 3, 'trivial_rtt': 3, 'fresh_rtt': 3, 'local_connect': 1}
# A deployment task is three samples of two runs; Ansible's on 48 hosts took
# 3-4 minutes a run on these loaded cores.
TASK_TIMEOUT = {'files': 900, 'many_hosts': 900, 'memory': 900, 'wan': 600,
                'deploy': 1800, 'deploy_many': 3600, 'thousand': 1200,
                'wan_real': 600}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m bench', description=__doc__.split('\n\n')[0])
    p.add_argument('--hosts', type=int, default=None,
                   help='hosts for the many-host rows (default 48; 8 with --quick)')
    p.add_argument('--deploy-hosts', type=int, default=None,
                   help='hosts for the smaller whole-deployment rows (default 16; 4 with --quick); '
                        'the larger ones take --hosts')
    p.add_argument('--repeat', type=int, default=None,
                   help='repetitions per figure, median reported (default 5; 3 with --quick); '
                        'file, WAN and many-host rows use at most 3')
    p.add_argument('--quick', action='store_true',
                   help='a smaller run: 32 MiB files, 8 hosts, 100 tunnels for memory, fewer calls')
    p.add_argument('--only', default='',
                   help='comma-separated row ids (%s)' % ', '.join(r.id for r in ROWS))
    p.add_argument('--columns', default='',
                   help='comma-separated column ids (%s)' % ', '.join(c.id for c in COLUMNS))
    p.add_argument('--json', metavar='PATH', help='also write every sample as JSON')
    p.add_argument('--wan-delay-ms', type=float, default=25.0,
                   help='slowlink delay each way for the WAN rows (default 25 = 50 ms RTT)')
    p.add_argument('--file-mib', type=int, default=None, help='size of the put/fetch file')
    p.add_argument('--mem-tunnels', type=int, default=None,
                   help='Local tunnels for the memory row (default 1000; 100 with --quick)')
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.only.split(',') if r.strip()]
    unknown = [r for r in rows if r not in ROW_BY_ID]
    if unknown:
        p.error('unknown rows %s; choose from %s' % (unknown, ', '.join(ROW_BY_ID)))
    args.rows = rows or [r.id for r in ROWS]
    cols = [c.strip() for c in args.columns.split(',') if c.strip()]
    known = {c.id for c in COLUMNS}
    if set(cols) - known:
        p.error('unknown columns %s' % sorted(set(cols) - known))
    args.column_ids = cols or [c.id for c in COLUMNS]
    return args


def settings(args):
    quick = args.quick
    repeat = args.repeat or (3 if quick else 5)
    heavy = min(repeat, 1 if quick else 3)
    return {
        'repeat': repeat,
        'heavy_repeat': heavy,
        'wan_repeat': heavy,
        'local_repeat': repeat * 4,
        'rtt_calls': 500 if quick else 2000,
        'wan_rtt_calls': 5 if quick else 10,
        'pipelined_calls': 5000 if quick else 20000,
        'gather_calls': 2000,
        'fresh_calls': 1000,  # as a user's script: no warm-up call
        'echo_bytes': 4 * MiB,
        'echo_rounds': 2 if quick else 5,
        'file_size': (args.file_mib or (32 if quick else 256)) * MiB,
        'many_call_rounds': 10 if quick else 100,  # 20 rounds per sample was too few to repeat
        'n_hosts': args.hosts or (8 if quick else 48),
        'deploy_hosts': args.deploy_hosts or (4 if quick else 16),
        'mem_tunnels': args.mem_tunnels or (100 if quick else 1000),
        'thousand_hosts': 100 if quick else 1000,
        'thousand_rounds': 5 if quick else 20,  # rounds per sample of thousand_call
    }


def run_task(column, task, python, ctx_path, workdir, env, logdir):
    """One subprocess of one column's script; returns {row_id: cell}."""
    script = os.path.join(fixtures.PEERS_DIR, column.script)
    argv = [python, script, task, ctx_path]
    log_path = os.path.join(logdir, '%s.%s.log' % (task, column.id))
    fixtures.wait_for_quiet()
    start = time.monotonic()
    with open(log_path, 'w') as errlog:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=errlog, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=TASK_TIMEOUT.get(task, 300))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the script and its children
            proc.communicate()
            return {'__task__': {'error': 'timed out after %ds' % TASK_TIMEOUT.get(task, 300)}}
        finally:
            # Peers leave ssh and python children behind when their script exits.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    elapsed = time.monotonic() - start
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-3:]
        return {'__task__': {'error': 'no result (exit %s): %s' % (proc.returncode, ' | '.join(tail))}}
    data = json.loads(lines[-1][len(RESULT_PREFIX):])
    if 'rows' in data:
        cells = data['rows']
    else:
        cells = {'__task__': data}
    log('%-14s %-15s %6.1fs  %s' % (task, column.id, elapsed, summary(cells)))
    return cells


def merge(old, new):
    """Combine the cells of one column and row from several rounds.

    A round that failed while others measured leaves its error in
    ``extra['failed rounds']`` (shown in the notes) instead of hiding the row.
    """
    if old is None or new is None:
        return new if old is None else old
    if 'samples' not in old and 'samples' not in new:
        return old
    if 'samples' not in old or 'samples' not in new:
        good, bad = (old, new) if 'samples' in old else (new, old)
        if 'error' not in bad:
            return good
        extra = dict(good.get('extra') or {})
        extra['failed rounds'] = extra.get('failed rounds', []) + [bad['error']]
        return dict(good, extra=extra)
    merged = dict(old, samples=old['samples'] + new['samples'])
    merged['median'] = statistics.median(merged['samples'])
    extra = dict(old.get('extra') or {})
    for key, value in (new.get('extra') or {}).items():
        if isinstance(value, list) and isinstance(extra.get(key), list):
            extra[key] = extra[key] + value
        else:
            extra[key] = value
    merged['extra'] = extra
    return merged


def summary(cells):
    parts = []
    for row_id, cell in cells.items():
        if 'median' in cell:
            unit = ROW_BY_ID[row_id].unit if row_id in ROW_BY_ID else ''
            parts.append('%s=%s' % (row_id, report.fmt(cell['median'], unit)))
        else:
            parts.append('%s: %s' % (row_id, cell.get('na') or cell.get('error')))
    return '; '.join(parts)


def prepare(args, conf, sshd, workdir, control_dir):
    """Data files and the context every column's script receives."""
    wan_config = None
    slowlink = fixtures.find_slowlink()
    if slowlink:
        wan_config = fixtures.write_wan_config(
            sshd.ssh_config, slowlink, args.wan_delay_ms, os.path.join(workdir, 'ssh_config.wan'))
    else:
        log('slowlink.py not found: the WAN rows will be n/a (set BENCH_SLOWLINK)')
    file_path = os.path.join(workdir, 'payload.bin')
    if 'files' in tasks_for(args.rows):
        log('writing %d MiB of random data' % (conf['file_size'] // MiB))
        fixtures.make_random_file(file_path, conf['file_size'])
    tree_dir = os.path.join(workdir, 'tree')
    conf['modules_in_tree'] = fixtures.make_module_tree(tree_dir)
    real_dir, real_python = None, None
    if 'wan_real' in tasks_for(args.rows):
        real_dir, problem = fixtures.ensure_real_packages()
        if problem:
            log('the real-packages import row will be n/a: %s' % problem)
        real_python = fixtures.bare_python(os.path.join(workdir, 'bare-python'))
    mem_cap = int(fixtures.mem_available() * 0.6 // (10 * MiB))  # an idle agent: ~8.5 MiB PSS
    if conf['mem_tunnels'] > mem_cap:
        log('memory row: %d tunnels (not %d): MemAvailable is low' % (mem_cap, conf['mem_tunnels']))
        conf['mem_tunnels'] = mem_cap
    if conf['thousand_hosts'] > mem_cap:
        log('thousand rows: %d hosts (not %d): MemAvailable is low' % (mem_cap, conf['thousand_hosts']))
        conf['thousand_hosts'] = mem_cap
    scratch = os.path.join(workdir, 'scratch')
    os.makedirs(scratch)
    return dict(conf, **{
        'ssh_config': sshd.ssh_config, 'wan_ssh_config': wan_config,
        'host': sshd.aliases[0], 'hosts': list(sshd.aliases),
        'many_hosts': list(sshd.aliases[:conf['n_hosts']]),
        'deploy_hosts': list(sshd.aliases[:conf['deploy_hosts']]),
        'file_path': file_path, 'scratch': scratch, 'control_dir': control_dir,
        'tree_dir': tree_dir, 'tree_pkg': fixtures.TREE_PKG,
        'real_packages_dir': real_dir, 'real_python': real_python,
        # One absolute interpreter for every column: over ssh, 'python3' may be
        # a pyenv shim (+130 ms) that some libraries would dodge and others not.
        'remote_python': fixtures.system_python(),
        'local_python': fixtures.system_python(),
        'old_remote_python': fixtures.old_python(),
    })


def measure(args, conf, base_ctx, peer_python, peer_problem, env, workdir, logdir):
    """Run every selected task for every column: {row_id: {column_id: cell}}."""
    results = {row_id: {} for row_id in args.rows}
    for task in tasks_for(args.rows):
        task_rows = [r for r in args.rows if ROW_BY_ID[r].task == task]
        columns = [c for c in COLUMNS if c.id in args.column_ids and not (
            c.id == 'ours-paramiko' and all(ROW_BY_ID[r].transport_free for r in task_rows))
            and any(measures(c, ROW_BY_ID[r]) for r in task_rows)]
        # The columns take turns, a few samples each, so that a burst of load from
        # elsewhere on the machine does not land on one column's samples only.
        if task in NOT_INTERLEAVED:
            rounds = 1
        elif task in ONE_SAMPLE_PER_TURN:
            rounds = conf['repeat'] * ONE_SAMPLE_PER_TURN[task]
        else:
            rounds = conf['heavy_repeat']
        round_ctx = {}
        if rounds > 1:
            round_ctx = {'heavy_repeat': 1, 'wan_repeat': 1,
                         'repeat': -(-conf['repeat'] // rounds),
                         'local_repeat': -(-conf['local_repeat'] // rounds)}
        for _ in range(rounds):
            for column in columns:
                if column.venv and peer_python is None:
                    cells = {'__task__': {'na': peer_problem}}
                else:
                    ctx = dict(base_ctx, subject=column.id, options=column.options, **round_ctx)
                    ctx_path = os.path.join(workdir, 'ctx-%s.json' % column.id)
                    with open(ctx_path, 'w') as f:
                        json.dump(ctx, f)
                    python = peer_python if column.venv else sys.executable
                    cells = run_task(column, task, python, ctx_path, workdir, env, logdir)
                whole_task = cells.pop('__task__', None)
                for row_id in task_rows:
                    cell = cells.get(row_id, whole_task)
                    if cell and cell.get('na') == 'not measured for this column':
                        cell = None
                    results[row_id][column.id] = merge(results[row_id].get(column.id), cell)
    return results


def main(argv=None):
    args = parse_args(argv)
    conf = settings(args)
    command = 'python -m bench ' + ' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.monotonic()
    load_before = os.getloadavg()
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    logdir = os.path.join(fixtures.BENCH_DIR, 'results', 'logs-' + stamp)
    os.makedirs(logdir)
    workdir = tempfile.mkdtemp(prefix='chopsticks-bench-')
    control_dir = tempfile.mkdtemp(prefix='cb-', dir='/tmp')  # a ControlPath must stay short

    # As pip installs it: byte-compiled, even where PYTHONDONTWRITEBYTECODE is
    # set (the peers in their environment are).
    fixtures.byte_compile(os.path.join(fixtures.REPO, 'chopsticks'))
    n_aliases = max(conf['n_hosts'], conf['deploy_hosts'])
    log('starting loopback sshd with %d aliases' % n_aliases)
    sshd = fixtures.start_sshd(['host%d' % i for i in range(1, n_aliases + 1)])
    try:
        peer_python, peer_problem = fixtures.ensure_peer_env()
        base_ctx = prepare(args, conf, sshd, workdir, control_dir)
        env = dict(os.environ, **sshd.env())
        env.pop('PYTHONPATH', None)  # the remote must find the module tree only through imports served
        env['PYTHONUNBUFFERED'] = '1'
        # What chopsticks learns in one run and keeps for the next (chopsticks.cache):
        # from nothing, so the figures do not depend on this user's past runs.
        env['CHOPSTICKS_CACHE_DIR'] = os.path.join(workdir, 'cache')
        results = measure(args, conf, base_ctx, peer_python, peer_problem, env, workdir, logdir)
    finally:
        sshd.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(control_dir, ignore_errors=True)
    elapsed = time.monotonic() - started

    load = 'load average %.1f at the start, %.1f at the end' % (load_before[0], os.getloadavg()[0])
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=fixtures.REPO,
                            capture_output=True, text=True).stdout.strip() or '?'
    machine = '%s; %d cores; Python %s; %s' % (
        platform.platform(), os.cpu_count(), platform.python_version(), fixtures.ssh_version())
    versions = fixtures.peer_versions(peer_python) if peer_python else {}
    print()
    print(report.table(results, conf))
    print()
    print('%s (%.0f s, commit %s) on %s; %s' % (command, elapsed, commit, machine, load))
    if versions:
        print('peers: ' + ', '.join('%s %s' % kv for kv in versions.items()))
    print('Medians of %d runs (%d for connects and %d for round trips, a turn each; '
          '%d for files, WAN and many hosts), taken in %d turns per column, '
          'each run starting once the CPUs are idle again. ×: ratio to the floor; for pipelined calls to execnet, for the WAN import and '
          'one call to many hosts to the best peer. Every column runs %s on the remote. '
          'Ours starts from an empty cache (chopsticks.cache): its very first connect '
          'compiles the agent on the host, later ones reuse what that one learned.' % (
              conf['repeat'] if conf['heavy_repeat'] < 2 else
              conf['heavy_repeat'] * -(-conf['repeat'] // conf['heavy_repeat']),
              conf['repeat'] * ONE_SAMPLE_PER_TURN['connect_call'],
              conf['repeat'] * ONE_SAMPLE_PER_TURN['trivial_rtt'],
              conf['heavy_repeat'], conf['heavy_repeat'], base_ctx['remote_python']))
    print()
    print(report.notes(results, conf))
    print('\nlogs: %s' % os.path.relpath(logdir))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({
                'command': command, 'date': stamp, 'machine': machine, 'seconds': elapsed,
                'commit': commit, 'load': load, 'settings': conf, 'peers': versions,
                'rows': {row_id: {'label': label(ROW_BY_ID[row_id], conf),
                                  'unit': ROW_BY_ID[row_id].unit,
                                  'target': ROW_BY_ID[row_id].target_text, 'columns': cells}
                         for row_id, cells in results.items()},
            }, f, indent=1)
        log('wrote %s' % args.json)


if __name__ == '__main__':
    main()

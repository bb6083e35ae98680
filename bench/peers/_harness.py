"""The measuring side shared by every column of the benchmark (stdlib only).

Each column of the table (the floor, ours, each peer) is one script in this
directory, run as a subprocess by ``python -m bench``: ours with the project's
interpreter, the peers with the interpreter of ``bench/.env-peers``, so that
nothing of one column is ever imported into another's process. A script
defines one function per *task* (named as in ``bench/rows.py``) and ends with
``_harness.main(globals())``.

A task receives a :class:`Context` and returns a :class:`Result`, or a dict of
them keyed by row id when one set-up serves several rows (connecting 48 hosts
once for both "connect 48 hosts" and "one call to 48 hosts"). It raises
:class:`NotAvailable` when the column cannot do the thing at all: the table
shows the reason instead of a number.

The result travels back as one JSON line prefixed with ``BENCH-RESULT`` on
stdout, so whatever a library prints on its own does not disturb it.
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

RESULT_PREFIX = 'BENCH-RESULT '
clock = time.perf_counter


class NotAvailable(Exception):
    """This column cannot measure this row (the message says why)."""


class Result:
    """Samples of one metric, one per repetition; the table shows the median."""

    def __init__(self, samples, unit, note='', extra=None):
        self.samples = [float(s) for s in samples]
        self.unit = unit
        self.note = note
        self.extra = extra or {}

    def to_json(self):
        return {
            'samples': self.samples, 'unit': self.unit,
            'median': statistics.median(self.samples) if self.samples else None,
            'note': self.note, 'extra': self.extra,
        }


class Context:
    """What the driver set up, as attributes (see ``bench/fixtures.py``)."""

    def __init__(self, data):
        self.__dict__.update(data)

    def log(self, *args):
        print('[%s]' % self.subject, *args, file=sys.stderr, flush=True)


def timed(fn, *args):
    """Seconds taken by one call of ``fn(*args)``."""
    start = clock()
    fn(*args)
    return clock() - start


def per_op(fn, count):
    """Mean seconds per call over ``count`` calls of ``fn()``."""
    start = clock()
    for _ in range(count):
        fn()
    return (clock() - start) / count


def samples(repeat, fn):
    """``fn()`` evaluated ``repeat`` times: one sample each."""
    return [fn() for _ in range(repeat)]


def round_samples(ctx, round_):
    """Seconds per ``round_()`` (one call to every host), ``ctx.repeat``
    samples of ``ctx.many_call_rounds`` rounds each, after a tenth as many
    rounds left uncounted: the connections were made just before, and their
    threads and processes may still be settling."""
    for _ in range(ctx.many_call_rounds // 10):
        round_()
    return samples(ctx.repeat, lambda: per_op(round_, ctx.many_call_rounds))


def mb_per_s(nbytes, seconds):
    return nbytes / seconds / 1e6


def file_sha1(path):
    import hashlib
    digest = hashlib.sha1()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def check_copy(src, dst, size):
    """A transfer that did not arrive whole must not be reported as fast."""
    got = os.path.getsize(dst)
    if got != size:
        raise AssertionError('%s has %d bytes, expected %d from %s' % (dst, got, size, src))


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rss_bytes():
    """Resident set size of this process, from /proc."""
    return _proc_status('VmRSS') * 1024


def thread_count():
    """Threads of this process as the kernel counts them (not only Python's)."""
    return _proc_status('Threads')


def _proc_status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise KeyError(key)


def deploy_rows(ctx, task, run_once):
    """The whole-deployment rows (``bench/peers/deploy_fns.py``) of one column.

    ``run_once(hosts, root)`` runs the column's deployment of every host in
    ``hosts`` under ``root`` once, from a fresh process, as its users run it,
    and returns ``{host: operations changed}`` as the tool reported them.
    Each sample starts from nothing (the hosts' directories removed): a
    first run, where four operations change (the package is there already),
    then a second on what it left, where only the command does (it runs
    every time).  Both runs are checked on disk and against those counts.
    Returns ``{row_id: Result}`` for ``task``'s rows.
    """
    import shutil
    hosts = ctx.deploy_hosts if task == 'deploy' else ctx.many_hosts
    root = os.path.join(ctx.scratch, 'deploy-%s' % ctx.subject)
    first, second = [], []
    for _ in range(ctx.heavy_repeat):
        shutil.rmtree(root, ignore_errors=True)
        for seconds, expected in ((first, 4), (second, 1)):
            start = clock()
            changed = run_once(hosts, root)
            seconds.append(clock() - start)
            check_deployed(root, hosts)
            wrong = {host: changed.get(host) for host in hosts if changed.get(host) != expected}
            if wrong:
                raise AssertionError('%d operations should have changed on each host, not %s'
                                     % (expected, wrong))
    shutil.rmtree(root, ignore_errors=True)
    suffix = '' if task == 'deploy' else '_many'
    note = '%d hosts' % len(hosts)
    return {'deploy_first' + suffix: Result(first, 's', note=note),
            'deploy_second' + suffix: Result(second, 's', note=note)}


def check_deployed(root, hosts):
    """A deployment that did not do its work must not be reported as fast."""
    import deploy_fns
    for host in hosts:
        directory = deploy_fns.app_dir(root, host)
        with open(os.path.join(directory, 'app.conf')) as f:
            if f.read() != deploy_fns.CONTENT:
                raise AssertionError('%s/app.conf: not the content deployed' % directory)
        with open(os.path.join(directory, 'hosts')) as f:
            lines = f.read().splitlines()
        if lines.count(deploy_fns.LINE) != 1:
            raise AssertionError('%s/hosts: %d times %r' % (directory, lines.count(deploy_fns.LINE),
                                                             deploy_fns.LINE))
        for name, mode in (('', 0o755), ('app.conf', 0o644)):
            got = os.stat(os.path.join(directory, name)).st_mode & 0o7777
            if got != mode:
                raise AssertionError('%s: mode %o, not %o' % (os.path.join(directory, name), got, mode))


def run_logged(argv, log_path, env=None, cwd=None):
    """Run a deployment command, its output appended to ``log_path``; raise if it fails."""
    import subprocess
    with open(log_path, 'a') as log:
        log.write('$ %s\n' % ' '.join(argv))
        log.flush()
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env, cwd=cwd)
    if proc.returncode:
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-5:]
        raise RuntimeError('%s exited with %d: %s' % (argv[0], proc.returncode, ' | '.join(tail)))


def main(namespace):
    parser = argparse.ArgumentParser()
    parser.add_argument('task')
    parser.add_argument('context', help='JSON file written by the driver')
    args = parser.parse_args()
    with open(args.context) as f:
        ctx = Context(json.load(f))
    task = namespace.get(args.task)
    if task is None:
        out = {'na': 'not measured for this column'}
    else:
        try:
            result = task(ctx)
        except NotAvailable as exc:
            out = {'na': str(exc) or 'n/a'}
        except BaseException as exc:  # report, never hang the driver
            traceback.print_exc()
            out = {'error': '%s: %s' % (type(exc).__name__, exc)}
        else:
            if isinstance(result, dict):
                out = {'rows': {row: _row_json(r) for row, r in result.items()}}
            else:
                out = {'rows': {args.task: _row_json(result)}}
    sys.stdout.write('\n' + RESULT_PREFIX + json.dumps(out) + '\n')
    sys.stdout.flush()
    # Peers leave threads and children behind: do not wait for them.
    os._exit(0)


def _row_json(result):
    if isinstance(result, NotAvailable):
        return {'na': str(result)}
    if isinstance(result, Exception):
        return {'error': '%s: %s' % (type(result).__name__, result)}
    return result.to_json()

"""The floor column: what OpenSSH and the interpreter cost with no library at all.

Run by ``python -m bench`` with the project's interpreter; stdlib and the
``ssh``, ``scp`` and ``sftp`` binaries only.
"""
import os
import select
import shutil
import subprocess
import threading

import _harness as h
from _harness import Result, clock

DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE


def ssh(ctx, host, *cmd, config=None, opts=()):
    return ['ssh', '-F', config or ctx.ssh_config, *opts, host, *cmd]


def run(argv, **kw):
    subprocess.run(argv, stdin=DEVNULL, stdout=DEVNULL, check=True, **kw)


class Cat:
    """A persistent ``ssh host cat``: bytes in, the same bytes back."""

    def __init__(self, argv, wait=True):
        self.proc = subprocess.Popen(argv, stdin=PIPE, stdout=PIPE, bufsize=0)
        self.win, self.rout = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        if wait:
            self.ready()

    def ready(self):
        self.round_trip(b'x' * 16)  # connected once the first echo is back

    def round_trip(self, data):
        os.write(self.win, data)
        self.read_exactly(len(data))

    def read_exactly(self, n):
        while n:
            chunk = os.read(self.rout, min(n, 1 << 20))
            if not chunk:
                raise EOFError('ssh cat closed')
            n -= len(chunk)

    def echo(self, data):
        """Write ``data`` from a thread while reading it back here."""
        writer = threading.Thread(target=self.proc.stdin.write, args=(data,))
        writer.start()
        self.read_exactly(len(data))
        writer.join()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# -- rows ----------------------------------------------------------------------

def connect_call(ctx):
    argv = ssh(ctx, ctx.host, ctx.remote_python, '-c', 'pass')
    return Result(h.samples(ctx.repeat, lambda: h.timed(run, argv)), 's',
                  note='ssh host python3 -c pass')


def reconnect(ctx):
    """A second ``ssh`` to a host whose ControlMaster is up."""
    path = os.path.join(ctx.control_dir, 'floor-%C')
    mux = ['-o', 'ControlPath=' + path]
    master = subprocess.Popen(ssh(ctx, ctx.host, opts=mux + ['-o', 'ControlMaster=yes', '-N']),
                              stdin=DEVNULL)
    try:
        _wait_master(ctx, mux)
        argv = ssh(ctx, ctx.host, ctx.remote_python, '-c', 'pass',
                   opts=mux + ['-o', 'ControlMaster=no'])
        result = h.samples(ctx.repeat, lambda: h.timed(run, argv))
    finally:
        master.terminate()
        master.wait()
    return Result(result, 's', note='ssh -o ControlPath=... python3 -c pass (master up)')


def _wait_master(ctx, mux):
    deadline = clock() + 15
    while clock() < deadline:
        check = subprocess.run(ssh(ctx, ctx.host, opts=mux + ['-O', 'check']),
                               stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
        if check.returncode == 0:
            return
    raise RuntimeError('ControlMaster did not come up')


def trivial_rtt(ctx, config=None, calls=None):
    cat = Cat(ssh(ctx, ctx.host, 'cat', config=config))
    try:
        data = b'0123456789abcdef'
        calls = calls or ctx.rtt_calls
        return Result(h.samples(ctx.repeat, lambda: h.per_op(lambda: cat.round_trip(data), calls)),
                      's', note='16 bytes through a persistent ssh host cat')
    finally:
        cat.close()


def fresh_rtt(ctx):
    """A new ``ssh host cat``, used as soon as its first echo is back."""
    data = b'0123456789abcdef'
    samples = []
    for _ in range(ctx.repeat):
        cat = Cat(ssh(ctx, ctx.host, 'cat'))
        try:
            samples.append(h.per_op(lambda: cat.round_trip(data), ctx.fresh_calls))
        finally:
            cat.close()
    return Result(samples, 's', note='16 bytes through a new ssh host cat')


def echo_4mib(ctx):
    cat = Cat(ssh(ctx, ctx.host, 'cat'))
    data = os.urandom(ctx.echo_bytes)
    try:
        cat.echo(data)  # warm
        return Result(h.samples(ctx.repeat, lambda: h.mb_per_s(
            2 * len(data), h.per_op(lambda: cat.echo(data), ctx.echo_rounds))), 'MB/s',
            note='ssh host cat, written and read at once')
    finally:
        cat.close()


def files(ctx):
    """put and fetch through ``ssh cat``, with scp and sftp beside it."""
    size, src = ctx.file_size, ctx.file_path
    remote = os.path.join(ctx.scratch, 'floor-remote.bin')
    local = os.path.join(ctx.scratch, 'floor-local.bin')
    mux_path = os.path.join(ctx.control_dir, 'files-%C')
    mux = ['-o', 'ControlPath=' + mux_path]
    master = subprocess.Popen(ssh(ctx, ctx.host, opts=mux + ['-o', 'ControlMaster=yes', '-N']),
                              stdin=DEVNULL)
    try:
        _wait_master(ctx, mux)
        cfg = ['-F', ctx.ssh_config] + mux
        scp = lambda a, b: h.timed(run, ['scp', '-q', *cfg, a, b])
        sftp_batch = os.path.join(ctx.scratch, 'sftp-batch')

        def sftp(cmd):
            with open(sftp_batch, 'w') as f:
                f.write(cmd + '\n')
            return h.timed(run, ['sftp', '-q', '-b', sftp_batch, *cfg, ctx.host])

        def once(fn, dst):
            seconds = fn()
            h.check_copy(src, dst, size)
            h.remove(dst)
            return h.mb_per_s(size, seconds)

        put = {'ssh cat': [], 'sftp': [], 'scp': []}
        fetch = {'ssh cat': [], 'sftp': [], 'scp': []}
        for _ in range(ctx.heavy_repeat):
            put['ssh cat'].append(once(lambda: _cat_put(ctx, src, remote), remote))
            fetch['ssh cat'].append(once(lambda: _cat_fetch(ctx, src, local), local))
            put['sftp'].append(once(lambda: sftp('put %s %s' % (src, remote)), remote))
            fetch['sftp'].append(once(lambda: sftp('get %s %s' % (src, local)), local))
            put['scp'].append(once(lambda: scp(src, ctx.host + ':' + remote), remote))
            fetch['scp'].append(once(lambda: scp(ctx.host + ':' + src, local), local))
    finally:
        master.terminate()
        master.wait()
    note = 'ssh cat after the login; sftp and scp over a ready ControlMaster'
    return {
        'put': Result(put['ssh cat'], 'MB/s', note, extra={k: v for k, v in put.items() if k != 'ssh cat'}),
        'fetch': Result(fetch['ssh cat'], 'MB/s', note, extra={k: v for k, v in fetch.items() if k != 'ssh cat'}),
    }


def _cat_put(ctx, src, remote):
    """Time ``ssh host 'cat > remote' < src`` from the moment the login is done."""
    proc = subprocess.Popen(ssh(ctx, ctx.host, 'echo ready; exec cat > ' + remote),
                            stdin=PIPE, stdout=PIPE, bufsize=0)
    proc.stdout.readline()
    start = clock()
    with open(src, 'rb') as f:
        shutil.copyfileobj(f, proc.stdin, 1 << 20)
    proc.stdin.close()
    proc.wait()
    return clock() - start


def _cat_fetch(ctx, src, local):
    proc = subprocess.Popen(ssh(ctx, ctx.host, 'echo ready; read go; exec cat ' + src),
                            stdin=PIPE, stdout=PIPE, bufsize=0)
    proc.stdout.readline()
    start = clock()
    proc.stdin.write(b'go\n')
    with open(local, 'wb') as f:
        shutil.copyfileobj(proc.stdout, f, 1 << 20)
    proc.wait()
    return clock() - start


def wan(ctx):
    if not ctx.wan_ssh_config:
        raise h.NotAvailable('no slowlink.py')
    argv = ssh(ctx, ctx.host, ctx.remote_python, '-c', 'pass', config=ctx.wan_ssh_config)
    return {
        'wan_connect': Result(h.samples(ctx.wan_repeat, lambda: h.timed(run, argv)), 's',
                              note='ssh host python3 -c pass through slowlink'),
        'wan_rtt': trivial_rtt(ctx, config=ctx.wan_ssh_config, calls=ctx.wan_rtt_calls),
    }


def many_hosts(ctx):
    hosts = ctx.many_hosts

    def connect_all():
        procs = [subprocess.Popen(ssh(ctx, host, ctx.remote_python, '-c', 'pass'), stdin=DEVNULL)
                 for host in hosts]
        for proc in procs:
            if proc.wait():
                raise RuntimeError('ssh exited %d' % proc.returncode)

    connect = h.samples(ctx.heavy_repeat, lambda: h.timed(connect_all))
    cats = [Cat(ssh(ctx, host, 'cat'), wait=False) for host in hosts]
    for cat in cats:
        cat.ready()
    data = b'0123456789abcdef'

    def round_trip_all():
        for cat in cats:
            os.write(cat.win, data)
        pending = {cat.rout: len(data) for cat in cats}
        while pending:
            for fd in select.select(list(pending), [], [])[0]:
                pending[fd] -= len(os.read(fd, 4096))
                if not pending[fd]:
                    del pending[fd]

    try:
        call = h.round_samples(ctx, round_trip_all)
    finally:
        for cat in cats:
            cat.close()
    n = len(hosts)
    return {
        'many_connect': Result(connect, 's', note='%d x ssh python3 -c pass in parallel' % n),
        'many_call': Result(call, 's', note='16 bytes to %d persistent ssh cat and back' % n),
    }


def local_connect(ctx):
    argv = [ctx.local_python, '-c', 'pass']
    return Result(h.samples(ctx.repeat, lambda: h.timed(run, argv)), 's',
                  note='%s -c pass' % ctx.local_python)


if __name__ == '__main__':
    h.main(globals())

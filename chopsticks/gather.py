"""Several functions in one round trip, each with its own timeout.  Runs on the host.

``chopsticks facts`` sends :func:`gather` the facts the plugin registry
names, as ``'module:qualname'`` references the host imports (through the
import hook): a slow fact (a hung NFS mount) costs only itself, and the core
command line needs no particular plugin distribution.

Standard library only, Python 3.6+: this module runs on hosts.
"""
import importlib
import threading
import time

__all__ = ['gather']

DEFAULT_TIMEOUT = 5.0  # seconds a function may take when its timeout is not given


def gather(refs, timeouts=None, default_timeout=DEFAULT_TIMEOUT):
    """``{ref: value}`` for each ``'module:qualname'`` of ``refs``, called with
    no arguments, in parallel daemon threads.

    ``timeouts`` maps a ref to its seconds (others get ``default_timeout``);
    a function that failed, could not be imported or overran its time holds
    ``{'error': 'TypeName: message'}`` instead of its value.  Takes about as
    long as the slowest answer.  (A thread blocked in the kernel cannot be
    interrupted; a daemon thread at least never keeps the host's Python alive.)
    """
    timeouts = timeouts or {}
    started = time.time()
    results = {}
    running = {}
    for ref in refs:
        try:
            running[ref] = _start(_resolve(ref))
        except Exception as exc:
            results[ref] = _error(exc)
    for ref, (thread, outcome) in running.items():
        limit = timeouts.get(ref)
        limit = default_timeout if limit is None else limit
        thread.join(max(0.0, started + limit - time.time()))
        if thread.is_alive():
            results[ref] = {'error': 'TimeoutError: %s did not answer within %gs' % (ref, limit)}
        elif 'error' in outcome:
            results[ref] = _error(outcome['error'])
        else:
            results[ref] = outcome['value']
    return dict((ref, results[ref]) for ref in refs)


def _resolve(ref):
    module, sep, qualname = ref.partition(':')
    if not sep or not qualname:
        raise LookupError("%r is not a 'module:function' reference" % (ref,))
    obj = importlib.import_module(module)
    for part in qualname.split('.'):
        obj = getattr(obj, part)
    return obj


def _start(fn):
    outcome = {}

    def run():
        try:
            outcome['value'] = fn()
        except BaseException as exc:  # handed to gather, which reports it
            outcome['error'] = exc

    thread = threading.Thread(target=run, name='chopsticks-gather-%s' % getattr(fn, '__name__', 'fn'))
    thread.daemon = True
    thread.start()
    return thread, outcome


def _error(exc):
    return {'error': '%s: %s' % (type(exc).__name__, exc)}

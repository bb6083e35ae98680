"""chopsticks-facts: read-only questions about a host, answered on the host.

Every fact is a module-level function returning a typed, JSON-friendly
value.  The host gets these modules through chopsticks' import hook, so they
import only the standard library and run on Python 3.6+; only
:mod:`chopsticks_facts.plugin` (controller side) imports chopsticks.

    from chopsticks import Local, facts
    Local().call(facts.ip)
    Local().call(chopsticks_facts.gather, ['ip', 'memory'])   # one round trip
"""
import time

from chopsticks_facts._util import Job
from chopsticks_facts.net import default_route, interfaces, ip
from chopsticks_facts.storage import disks, mounts
from chopsticks_facts.system import (
    cpu, fqdn, hostname, kernel, memory, os_release, package_manager, python,
    service_manager, uptime, users, virtualization,
)

__version__ = "2.0.0"

#: The facts this package registers, by name.
FACTS = {f.__name__: f for f in (
    ip, interfaces, default_route, hostname, fqdn, os_release, kernel, cpu, memory,
    disks, mounts, users, python, uptime, package_manager, service_manager, virtualization,
)}

__all__ = sorted(FACTS) + ["FACTS", "gather"]

DEFAULT_TIMEOUT = 5.0


def _resolve(name):
    if name in FACTS:
        return FACTS[name]
    if ":" not in name:
        raise LookupError("chopsticks-facts has no fact %r (it has: %s); name another "
                          "plugin's fact as 'module:function'" % (name, ", ".join(sorted(FACTS))))
    import importlib

    module, _, qualname = name.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def gather(names=None, fact_timeout=DEFAULT_TIMEOUT):
    """Several facts in one round trip, each with its own timeout.  Runs on the host.

    :param names: fact names of this package (``'ip'``), or any importable
        function as ``'module:function'`` (another plugin's fact); all of
        this package's facts when ``None``.
    :param fact_timeout: seconds each fact may take: a number for all, or a
        dict ``{name: seconds}`` (missing names get 5).  Facts run in
        parallel, so the whole takes about as long as the slowest answer.
        (Not called ``timeout``: ``tunnel.call`` takes that keyword itself.)
    :return: ``{name: value}``, where a fact that failed or timed out has
        ``{'error': 'TimeoutError: ...'}`` instead of its value.
    """
    if names is None:
        names = sorted(FACTS)
    elif isinstance(names, str):
        names = [names]
    timeouts = fact_timeout if isinstance(fact_timeout, dict) else {}
    default = DEFAULT_TIMEOUT if isinstance(fact_timeout, dict) else fact_timeout
    started = time.time()
    jobs = {}
    results = {}
    for name in names:
        try:
            jobs[name] = Job(_resolve(name)).start()
        except Exception as exc:
            results[name] = {"error": "%s: %s" % (type(exc).__name__, exc)}
    for name, job in jobs.items():
        limit = timeouts.get(name, default)
        try:
            results[name] = job.result(max(0.0, started + limit - time.time()))
        except TimeoutError:
            results[name] = {"error": "TimeoutError: %s did not answer within %gs" % (name, limit)}
        except Exception as exc:
            results[name] = {"error": "%s: %s" % (type(exc).__name__, exc)}
    return {name: results[name] for name in names}

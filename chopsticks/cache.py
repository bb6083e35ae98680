"""What the controller keeps between runs, in the user's cache directory.

Only what makes the next run start faster and does no harm when stale, lost
or shared between processes:

* the agent's compressed payload, keyed by a hash of what it is built from
  (building it compiles 60 kB of source: 15-20 ms on a small machine);
* what the controller learned about hosts and tools: which interpreters run
  our Python version (their first connect then skips compiling the agent on
  the host), and the OpenSSH client's version.

A wrong fact costs bytes, never correctness: the host checks the Python
version before it uses compiled code.  Every failure to read or write is
ignored (a read-only home, a full disk: nothing is kept).

Each fact is a small file of its own (``facts/<section>-<hash of key>``):
a connect reads one and learning writes one, however many hosts are known.
(One JSON file of every fact, rewritten at each learn, had grown to 7,800
entries here, 0.9 MB, from test runs' temporary ssh_configs: 7 ms to parse
at every first connect of a process, and a first connect to a fleet
rewrote it once per host.)  Past MAX_FACTS, the oldest are forgotten.

The directory is ``$CHOPSTICKS_CACHE_DIR``, else ``$XDG_CACHE_HOME/chopsticks``,
else ``~/.cache/chopsticks``; ``CHOPSTICKS_CACHE_DIR=`` (empty) keeps nothing.
Inside an agent (a relay host) nothing is kept either: chopsticks leaves no
files on the hosts it runs on.
"""
import hashlib
import json
import os
import sys
import threading

FACTS_DIR = 'facts'
LEGACY_FACTS_FILE = 'facts.json'  # before FACTS_DIR: removed when a fact is learned
MAX_FACTS = 20000  # files in FACTS_DIR; past it, the oldest quarter goes
PRUNE_EVERY = 1000  # learns in one process between two counts of FACTS_DIR
DIGEST_SIZE = 32  # a blob ends with the SHA-256 of what precedes it

_lock = threading.Lock()
_learned = 0  # facts written by this process (pruning looks at the first, then every PRUNE_EVERY)


def directory():
    """Where the cache lives, or None when nothing is to be kept."""
    if '_chopsticks_agent' in sys.modules:
        return None
    path = os.environ.get('CHOPSTICKS_CACHE_DIR')
    if path is not None:
        return path or None
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'chopsticks')


def read_blob(name):
    """The bytes stored under ``name``, or None (absent, unreadable, damaged)."""
    where = directory()
    if where is None:
        return None
    try:
        with open(os.path.join(where, name), 'rb') as f:
            data = f.read()
    except OSError:
        return None
    body, digest = data[:-DIGEST_SIZE], data[-DIGEST_SIZE:]
    if len(data) < DIGEST_SIZE or hashlib.sha256(body).digest() != digest:
        return None
    return body


def write_blob(name, data, keep=8):
    """Store ``data`` under ``name``; of the blobs whose names start like it
    (up to its first '-'), only the ``keep`` newest stay: each new version
    of chopsticks or Python makes new ones."""
    where = directory()
    if where is None:  # (os.scandir(None) would prune the working directory)
        return
    _write(name, data + hashlib.sha256(data).digest())
    prefix = name.split('-', 1)[0] + '-'
    try:
        kin = [entry for entry in os.scandir(where)
               if entry.name.startswith(prefix) and not entry.name.startswith('.')]
        kin.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)
        for entry in kin[keep:]:
            os.unlink(entry.path)
    except OSError:
        pass


def fact(section, key):
    """What was learned about ``key`` (JSON-able) in ``section``, or None."""
    where = directory()
    if where is None:
        return None
    try:
        with open(os.path.join(where, _fact_name(section, key)), 'rb') as f:
            stored_key, value = json.loads(f.read().decode('utf-8'))
    except (OSError, ValueError, TypeError):
        return None
    return value if stored_key == _key_text(key) else None  # (a hash collision)


def learn(section, key, value):
    """Remember ``value`` (JSON-able) for ``key``, for this and later runs."""
    global _learned
    if directory() is None or fact(section, key) == value:
        return
    _write(_fact_name(section, key), json.dumps([_key_text(key), value]).encode())
    with _lock:
        prune = _learned % PRUNE_EVERY == 0
        _learned += 1
    if prune:
        _prune_facts()


def _fact_name(section, key):
    digest = hashlib.sha256(_key_text(key).encode()).hexdigest()[:32]
    return os.path.join(FACTS_DIR, '%s-%s' % (section, digest))


def _prune_facts():
    """Keep FACTS_DIR under MAX_FACTS files, forgetting the oldest."""
    where = directory()
    try:
        os.unlink(os.path.join(where, LEGACY_FACTS_FILE))
    except OSError:
        pass
    try:
        entries = [e for e in os.scandir(os.path.join(where, FACTS_DIR))
                   if not e.name.startswith('.')]
        if len(entries) <= MAX_FACTS:
            return
        entries.sort(key=lambda entry: entry.stat().st_mtime)
        for entry in entries[:len(entries) - MAX_FACTS * 3 // 4]:
            os.unlink(entry.path)
    except OSError:
        pass


def _key_text(key):
    return json.dumps(key, sort_keys=True, default=repr)


def _write(name, data):
    """Write ``name`` (a path in the cache directory) whole or not at all:
    readers never see half a file."""
    where = directory()
    if where is None:
        return
    target = os.path.join(where, name)
    folder, base = os.path.split(target)
    temp = None
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        temp = os.path.join(folder, '.%s.%d.%d.tmp' % (base, os.getpid(), threading.get_ident()))
        with open(temp, 'wb') as f:
            f.write(data)
        os.replace(temp, target)
        temp = None
    except OSError:
        pass
    finally:
        if temp is not None:
            try:
                os.unlink(temp)
            except OSError:
                pass

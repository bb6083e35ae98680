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

FACTS_FILE = 'facts.json'
DIGEST_SIZE = 32  # a blob ends with the SHA-256 of what precedes it

_lock = threading.Lock()
_facts = None  # section -> {key: value}, read from disk once per process


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
    facts = _loaded()
    return facts.get(section, {}).get(_key_text(key))


def learn(section, key, value):
    """Remember ``value`` (JSON-able) for ``key``, for this and later runs."""
    text = _key_text(key)
    with _lock:
        facts = _loaded()
        if facts.get(section, {}).get(text) == value:
            return
        facts.setdefault(section, {})[text] = value
        # Merged with what other processes wrote meanwhile; a race between
        # two writers loses an entry, which is learned again next time.
        on_disk = _read_facts()
        for name, entries in facts.items():
            on_disk.setdefault(name, {}).update(entries)
        _write(FACTS_FILE, json.dumps(on_disk, sort_keys=True).encode())


def _loaded():
    global _facts
    if _facts is None:
        _facts = _read_facts()
    return _facts


def _read_facts():
    where = directory()
    if where is None:
        return {}
    try:
        with open(os.path.join(where, FACTS_FILE), 'rb') as f:
            facts = json.loads(f.read().decode('utf-8'))
    except (OSError, ValueError):
        return {}
    if not isinstance(facts, dict):
        return {}
    return {name: entries for name, entries in facts.items() if isinstance(entries, dict)}


def _key_text(key):
    return json.dumps(key, sort_keys=True, default=repr)


def _write(name, data):
    """Write ``name`` whole or not at all: readers never see half a file."""
    where = directory()
    if where is None:
        return
    temp = None
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
        temp = os.path.join(where, '.%s.%d.%d.tmp' % (name, os.getpid(), threading.get_ident()))
        with open(temp, 'wb') as f:
            f.write(data)
        os.replace(temp, os.path.join(where, name))
        temp = None
    except OSError:
        pass
    finally:
        if temp is not None:
            try:
                os.unlink(temp)
            except OSError:
                pass

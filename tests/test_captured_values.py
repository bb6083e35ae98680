"""Functions that travel as source keep the values they captured on the
controller: defaults (positional and keyword-only), closure cells (also ones
written with ``nonlocal``) and globals, on every remote Python.

The source is re-executed on the host, so anything Python evaluates at
definition time (defaults, annotations) must not be re-evaluated there: the
names they use may not exist on the host at all (``lambda i=i: ...``)."""
import collections
import os
import threading

import pytest

from chopsticks import Local


@pytest.fixture(scope='module')
def tunnels():
    opened = {}
    yield opened
    for tunnel in opened.values():
        tunnel.close()


@pytest.fixture
def remote(tunnels, remote_python):
    if remote_python not in tunnels:
        tunnels[remote_python] = Local('py', python=remote_python)
    return tunnels[remote_python]


def test_loop_variable_bound_by_a_default(remote):
    """The ``i=i`` idiom binds each lambda's own loop value."""
    fns = [lambda i=i: i * 10 for i in range(3)]
    assert [remote.call(f) for f in fns] == [0, 10, 20]


def test_keyword_only_defaults_travel_as_values(remote):
    def make(scale, offset):
        def fn(x, *, by=scale, plus=offset):
            return x * by + plus
        return fn
    assert remote.call(make(3, 1), 2) == 7
    assert remote.call(make(3, 1), 2, by=10) == 21


def test_defaults_that_are_objects(remote):
    point = collections.namedtuple('Point', 'x y')(1, 2)

    def helper(v):
        return v + 1

    def outer():
        table = {'a': (1, 2)}

        def fn(key='a', t=table, f=helper, mod=os, p=(point.x, point.y), lam=lambda: 'inner'):
            return t[key], f(41), mod.sep, p, lam()
        return fn
    assert remote.call(outer()) == ((1, 2), 42, '/', (1, 2), 'inner')


def test_annotations_naming_local_classes(remote):
    """Annotations are evaluated at definition time too."""
    class Local_:
        pass

    def fn(x: Local_ = None) -> Local_:
        return 'ran'
    assert remote.call(fn) == 'ran'


def test_closure_written_with_nonlocal(remote):
    def counter():
        count = 0

        def bump(times):
            nonlocal count
            for _ in range(times):
                count += 1
            return count
        return bump
    assert remote.call(counter(), 3) == 3


def test_recursive_nested_function(remote):
    def outer():
        def fact(n):
            return 1 if n <= 1 else n * fact(n - 1)
        return fact
    assert remote.call(outer(), 5) == 120


def test_filter_predicate_with_a_bound_default(remote):
    target = remote.call(os.getpid)
    predicates = [lambda p=target: os.getpid() == p,
                  lambda p=-1: os.getpid() == p]
    assert [remote.call(f) for f in predicates] == [True, False]


def test_group_filter_with_a_bound_default():
    from chopsticks import Group
    group = Group([Local('a'), Local('b')])
    try:
        pids = group.call(os.getpid).values()
        wanted = sorted(pids)[0]
        kept = group.filter(lambda p=wanted: os.getpid() == p)
        assert len(kept.tunnels) == 1
    finally:
        group.close()


def test_a_default_that_cannot_travel_is_named():
    lock = threading.Lock()

    def fn(guard=lock):
        return 'never'
    with Local('py') as tunnel:
        with pytest.raises(Exception) as info:
            tunnel.call(fn)
    message = str(info.value)
    assert 'fn' in message and "'guard'" in message and 'lock' in message, message

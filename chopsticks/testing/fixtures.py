"""chopsticks' pytest plugin: the fixtures below, available in any project
that has chopsticks installed (the ``pytest11`` entry point names this module).

``chopsticks_local``
    A :class:`chopsticks.Local` tunnel (a python subprocess on this machine),
    closed after the test::

        def test_my_fact(chopsticks_local):
            assert chopsticks_local.call(my_fact) == 42

``chopsticks_plugin_manager``
    A fresh :class:`chopsticks.plugins.PluginManager` with entry-point
    autoloading off, made current for the test (so ``chopsticks.facts``,
    ``chopsticks.tasks`` and ``tunnel_from_url`` see only what the test
    registers), and restored after::

        def test_my_plugin(chopsticks_plugin_manager):
            chopsticks_plugin_manager.register(my_plugin)
            from chopsticks.facts import my_fact

This module loads in every pytest run of such a project: it imports nothing
from chopsticks until a fixture is used.
"""
import pytest


@pytest.fixture
def chopsticks_local():
    """A ``chopsticks.Local`` tunnel, closed after the test."""
    from chopsticks import Local

    tunnel = Local()
    try:
        yield tunnel
    finally:
        tunnel.close()


@pytest.fixture
def chopsticks_plugin_manager():
    """A fresh plugin manager (autoload off) made current for the test."""
    from chopsticks.plugins import PluginManager, set_plugin_manager

    pm = PluginManager(autoload=False)
    previous = set_plugin_manager(pm)
    try:
        yield pm
    finally:
        set_plugin_manager(previous)

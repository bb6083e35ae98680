"""Test helpers for chopsticks and its plugins.

:mod:`chopsticks.testing.fixtures`
    The pytest plugin (registered by chopsticks' ``pytest11`` entry point):
    the ``chopsticks_local`` and ``chopsticks_plugin_manager`` fixtures.
:mod:`chopsticks.testing.sshd`
    A loopback OpenSSH server with generated keys and ssh_config aliases,
    for tests and for the benchmark (which runs without pytest).
"""

"""The hooks a chopsticks plugin may implement.

Each docstring below is the reference documentation of its hook: what the
hook is for, when chopsticks calls it, what its arguments are, and what a
plugin may rely on.  ``tests/test_plugins.py`` fails when a hook here is not
documented in ``README.rst`` ("Hook reference"), or has no test.

A plugin is a module (or any object) with functions decorated by
:data:`hookimpl`, named by an entry point in the ``chopsticks`` group::

    [project.entry-points.chopsticks]
    hello = "chopsticks_hello"

Hooks take a ``register`` callback instead of returning lists, so that
chopsticks knows which plugin registered what and can refuse a duplicate name
with a message naming both distributions.  An implementation may accept fewer
arguments than the spec names (pluggy's rule); all of these hooks have only
one argument.

Chopsticks calls the ``register`` hooks of every plugin lazily, the first
time a fact, task or tunnel scheme is looked up (``chopsticks.facts.ip``,
``tunnel_from_url('docker://web')``, ``chopsticks list-plugins``), and again
after a plugin is registered or unregistered.  A hook must therefore be cheap
and have no side effect beyond calling ``register``.
"""

from typing import Any, Callable

import pluggy

__all__ = ["hookspec", "hookimpl"]

#: Marks a function in this module as a hook specification.
hookspec = pluggy.HookspecMarker("chopsticks")

#: Marks a function in a plugin as the implementation of a hook::
#:
#:     from chopsticks import hookimpl
#:
#:     @hookimpl
#:     def chopsticks_register_facts(register):
#:         register(my_fact)
hookimpl = pluggy.HookimplMarker("chopsticks")


@hookspec
def chopsticks_register_facts(register: Callable[..., None]) -> None:
    """Register facts: read-only questions a controller asks a host.

    Call ``register(func, name=None, **metadata)`` once per fact.

    :param register:
        ``register(func, name=None, **metadata)``.

        * ``func`` is the fact itself: a function that runs **on the host**
          and returns a value the return codec can carry (``None``, ``bool``,
          ``int``, ``float``, ``str``, ``bytes``, ``list``, ``tuple``,
          ``dict``, sets, datetimes, ``Decimal``, ``UUID``, ``PurePath``;
          prefer JSON-friendly values so ``chopsticks facts --json`` can
          print them).  It must be a module-level function of an importable
          module, because the host imports it by name through the import
          hook; that module must import only the standard library (the host
          has no ``chopsticks`` package) and run on Python 3.6.
          Register it from a separate module (say ``plugin.py``) that holds
          the ``hookimpl``.
        * ``name`` defaults to ``func.__name__``.  It becomes an attribute of
          :mod:`chopsticks.facts`: ``from chopsticks.facts import <name>``.
        * ``metadata`` is kept and shown by ``chopsticks list-plugins --json``.
          Chopsticks reads ``timeout`` (seconds; the default per-fact timeout
          used by ``chopsticks facts``) and ``description`` (defaults to the
          first line of the docstring).

        ``register`` raises :class:`chopsticks.plugins.PluginError` for a
        function the host could not import (a nested function, a lambda, one
        defined in ``__main__``) or a name that is not a public identifier.
        Do not catch it: the plugin is then reported as broken by
        ``chopsticks list-plugins`` and none of its registrations are used,
        while every other plugin keeps working.

        A name that two plugins register is used by neither (whichever loaded
        first must not silently win): both are reported as ``error`` naming
        the other distribution, and asking for the name says so.

    :return: ``None``; the return value is ignored.

    Called once per plugin, lazily, on first use of the fact registry.
    """


@hookspec
def chopsticks_register_tasks(register: Callable[..., None]) -> None:
    """Register tasks: idempotent changes a controller makes to a host.

    Call ``register(func, name=None, **metadata)`` once per task.

    :param register:
        ``register(func, name=None, **metadata)``, with the same rules as
        :func:`chopsticks_register_facts` (a module-level, standard-library
        only function that runs on the host; ``name`` defaults to
        ``func.__name__`` and becomes an attribute of
        :mod:`chopsticks.tasks`; a name two plugins register is used by
        neither), and in addition:

        * ``func`` must accept a keyword argument ``check`` (``bool``,
          default ``False``).  With ``check=True`` it reports what it would
          change and changes nothing (``chopsticks run --check``).
          ``register`` raises :class:`chopsticks.plugins.PluginError` for a
          function without it.
        * ``func`` returns a ``dict`` with at least ``"changed": bool`` and
          ``"check": bool``.  ``changed`` must come from comparing the state
          of the host before and after (or, in check mode, from the plan),
          never from "a command ran".  Other keys are the task's own and
          are printed by ``chopsticks run``.
        * A task that fails raises an exception; the controller receives it
          as :class:`chopsticks.errors.RemoteException` and
          ``chopsticks run`` reports the host as failed.

    :return: ``None``; the return value is ignored.

    Called once per plugin, lazily, on first use of the task registry.
    """


@hookspec
def chopsticks_register_tunnels(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register tunnel types, each under a URL scheme.

    Host strings such as ``docker://web`` or ``sudo://postgres`` name a
    tunnel by scheme; :func:`chopsticks.hosts.tunnel_from_url` (used by
    the ``chopsticks`` command and by ``Group``) turns them into tunnels.
    Chopsticks registers its own ``ssh``, ``local``, ``sudo`` and ``docker``
    through this hook; a plugin adds a scheme the same way (for example
    ``podman``).

    :param register:
        ``register(scheme, factory)``.

        * ``scheme`` is lower-case letters, digits, ``+``, ``-`` or ``.``,
          starting with a letter (RFC 3986).  A scheme two plugins register
          is used by neither, and both are reported naming each other; a
          plugin cannot take over chopsticks' own ``ssh``, ``local``,
          ``sudo`` or ``docker``.
        * ``factory(address, **options)`` returns a connected-on-demand
          tunnel (an object with ``call``, ``call_async``, ``close`` and
          ``host``, normally a subclass of :class:`chopsticks.Tunnel`).
          ``address`` is the text between ``scheme://`` and ``?`` (possibly
          empty); ``options`` come from the query string, each value parsed
          as JSON when it is valid JSON (``?timeout=5`` gives ``5``) and kept
          as a string otherwise.  It should raise ``ValueError`` for an
          address it cannot use.

    :return: ``None``; the return value is ignored.

    Called once per plugin, lazily, on the first URL lookup.
    """

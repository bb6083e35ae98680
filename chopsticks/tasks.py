"""Tasks: idempotent changes to a host, registered by plugins.

Every task a plugin registered is an attribute of this module::

    from chopsticks import Local, tasks
    Local().call(tasks.install, 'hello', check=True)   # {'changed': True, ...}

    from chopsticks.tasks import install     # the same, imported by name

A task is a plain function that runs on the host, takes ``check=False``
and returns a dict with at least ``changed``.  Asking for a name no
plugin registered raises ``AttributeError`` (``ImportError`` for
``from chopsticks.tasks import ...``) saying which plugins are installed and,
for a well-known task, which distribution provides it (``chopsticks-pkg``).
``chopsticks list-plugins`` shows them all.
"""
import sys as _sys
from typing import Any as _Any, List as _List

from chopsticks import namespaces as _namespaces


def __getattr__(name: str) -> _Any:
    return _namespaces.namespace_getattr("task", __name__, name, _sys._getframe(1))


def __dir__() -> _List[str]:
    return _namespaces.namespace_dir("task", globals())

"""Facts: read-only questions about a host, registered by plugins.

Every fact a plugin registered is an attribute of this module::

    from chopsticks import Local, facts
    Local().call(facts.ip)                  # '192.0.2.2'

    from chopsticks.facts import memory     # the same, imported by name

A fact is a plain function that runs on the host.  Asking for a name no
plugin registered raises ``AttributeError`` (``ImportError`` for
``from chopsticks.facts import ...``) saying which plugins are installed and,
for a well-known fact, which distribution provides it (``chopsticks-facts``).
``chopsticks list-plugins`` shows them all.
"""
import sys as _sys
from typing import Any as _Any, List as _List

from chopsticks import namespaces as _namespaces


def __getattr__(name: str) -> _Any:
    return _namespaces.namespace_getattr("fact", __name__, name, _sys._getframe(1))


def __dir__() -> _List[str]:
    return _namespaces.namespace_dir("fact", globals())

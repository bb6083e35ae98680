"""The ``chopsticks.facts`` and ``chopsticks.tasks`` namespaces.

Each is a module whose attributes are the facts (tasks) that plugins
registered, looked up in the plugin manager's registry on first use: the
module's ``__getattr__`` and ``__dir__`` are :func:`namespace_getattr` and
:func:`namespace_dir`.
"""
from __future__ import annotations

import dis
import types
from typing import Any, Callable, Iterable, List, Optional

from chopsticks.plugins import UnknownNameError, get_plugin_manager

__all__ = ["namespace_getattr", "namespace_dir"]

_IMPORT_FROM = dis.opmap["IMPORT_FROM"]


def namespace_getattr(kind: str, module: str, name: str,
                      caller: Optional[types.FrameType]) -> Callable[..., Any]:
    """``__getattr__`` of :mod:`chopsticks.facts` and :mod:`chopsticks.tasks`:
    the fact (``kind='fact'``) or task registered as ``name``.

    ``from chopsticks.facts import nope`` would turn our AttributeError into a
    bare "cannot import name"; so when the ``caller`` frame is executing an
    ``IMPORT_FROM`` we raise the ImportError ourselves, with the message.
    """
    if name.startswith("__"):
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    try:
        return get_plugin_manager().lookup(kind, name)
    except UnknownNameError as exc:
        if _executing_import_from(caller):
            raise ImportError(str(exc), name=module) from None
        raise


def _executing_import_from(frame: Optional[types.FrameType]) -> bool:
    # Reads the caller's bytecode: CPython only, and only to choose which
    # exception carries the message.
    try:
        return frame.f_code.co_code[frame.f_lasti] == _IMPORT_FROM  # type: ignore[union-attr]
    except Exception:  # not CPython, or a frame we cannot read: plain AttributeError
        return False


def namespace_dir(kind: str, module_globals: Iterable[str]) -> List[str]:
    """``__dir__`` of the namespace: its own names and every registered ``kind``."""
    return sorted(set(module_globals) | set(get_plugin_manager().registry(kind)))

"""Values shown to a person on a terminal: remote text made safe, nested
values indented, lists of records as tables.

Everything a host sends is untrusted: a fact, a task's result or a command's
output may carry ``\\r``, ANSI or OSC escapes that would repaint the
terminal (``[web1] ok\\r[db1] FORGED`` reads as a line from db1).
:func:`printable` escapes every control character but the tab, so what a
person reads is what the host sent.
"""
import json
import re
from typing import Any, Dict, List, Sequence

__all__ = ["printable", "printable_lines", "printable_block", "value_lines", "table_lines"]

# C0 controls but tab, DEL, and C1 controls (U+0080-U+009F; U+009B is a
# one-character CSI on many terminals).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\x1b": "\\x1b"}

# A list of records becomes a table when it is at least this long; shorter
# ones read as well inline.
TABLE_MIN_ROWS = 2
INLINE_WIDTH = 72  # longer values go on lines of their own


def printable(text: str) -> str:
    """``text`` with control characters (tab excepted) escaped as ``\\n``,
    ``\\r``, ``\\x1b``, ...: one line, nothing a terminal acts on."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), "\\x%02x" % ord(m.group())), text)


def printable_lines(text: str, prefix: str = "") -> str:
    """``text`` escaped line by line (:func:`printable`), ``prefix`` before
    each line: the lines joined with newlines, no newline at the end."""
    return "\n".join(prefix + printable(line) for line in text.split("\n"))


def printable_block(text: str, indent: str) -> str:
    """A message of one or more lines, escaped line by line
    (:func:`printable`), to follow a label: its first line as it is, each
    further line after ``indent``, so it reads as belonging to the label
    above (``FAILED: could not connect: ...`` and ssh's lines under it).
    A trailing newline is dropped."""
    first, newline, rest = (text[:-1] if text.endswith("\n") else text).partition("\n")
    return printable(first) + (newline + printable_lines(rest, indent) if newline else "")


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, bytes):
        return printable(repr(value))
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return printable(str(value))


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list, tuple, set, frozenset))


def _inline(value: Any) -> str:
    """A small value on one line: scalars as they are, containers as JSON."""
    if _is_scalar(value):
        return _scalar(value)
    return printable(json.dumps(value, sort_keys=True, default=str))


def _cell_ok(value: Any) -> bool:
    return _is_scalar(value) or (isinstance(value, (list, tuple))
                                 and all(_is_scalar(v) for v in value))


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # mount options, group members: a, b, c
        return ",".join(_scalar(v) if not isinstance(v, str) else printable(v) for v in value)
    return _scalar(value)


def _records(value: Any) -> bool:
    """A list of dicts of scalars (or flat lists) that share their keys: a table."""
    return (isinstance(value, (list, tuple)) and len(value) >= TABLE_MIN_ROWS
            and all(isinstance(item, dict) and item for item in value)
            and all(_cell_ok(v) for item in value for v in item.values())
            and all(set(item) == set(value[0]) for item in value))


def table_lines(rows: Sequence[Dict[str, Any]], indent: str = "") -> List[str]:
    """Records with the same keys as an aligned table, keys as the header."""
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for row in cells:
        lines.append(indent + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return lines


def value_lines(name: str, value: Any, indent: str = "", width: int = 0) -> List[str]:
    """``name`` and ``value`` as lines for a person: a short value beside its
    name (names padded to ``width``), a long or nested one indented below it."""
    label = printable(name)
    nested = indent + "    "
    if _records(value):
        return [indent + label] + table_lines(value, nested)
    text = _inline(value)
    if _is_scalar(value) or (len(text) + len(indent) + width <= INLINE_WIDTH and "\\n" not in text):
        return [indent + label.ljust(width) + "  " + text]
    lines = [indent + label]
    if isinstance(value, dict):
        keys = [str(k) for k in value]
        inner = max(len(printable(k)) for k in keys) if keys else 0
        for key, item in zip(keys, value.values()):
            lines.extend(value_lines(key, item, nested, inner))
    else:
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        for item in items:
            if _is_scalar(item) or len(_inline(item)) + len(nested) <= INLINE_WIDTH:
                lines.append(nested + "- " + _inline(item))
            else:
                sub = value_lines("-", item, nested)
                lines.extend(sub)
    return lines

"""Reading inventory files: chopsticks' TOML, Ansible's INI and Ansible's YAML.

Each parser turns a file's text into an :class:`~chopsticks.inventory.Inventory`
(use :func:`chopsticks.inventory.load`, which picks the parser); errors
name the file, the line when the format gives one, and the name at fault.
"""
from __future__ import annotations

import ast
import difflib
import re
import shlex
from typing import Any, List, Optional, Sequence

from .inventory import SETTINGS, Inventory, InventoryError, expand_range
from .tunnel import is_ipv6_address, split_host_port

__all__ = ['parse_ini', 'parse_yaml', 'parse_toml']


def _expand(path: str, name: str, line: Optional[int]) -> List[str]:
    try:
        return expand_range(name)
    except ValueError as exc:
        raise InventoryError(path, str(exc), line, name) from None


def _host_port(path: str, name: str, variables: dict, line: Optional[int]) -> tuple:
    """A host's name and variables, ``name:port`` (``web[01:20]:2222`` too)
    setting ``ansible_port`` unless the variables set it, as Ansible does."""
    try:
        name, port = split_host_port(name)
    except ValueError as exc:
        raise InventoryError(path, str(exc), line, name) from None
    if port is not None and 'ansible_port' not in variables:
        variables = dict(variables, ansible_port=port)
    return name, variables


def _line_of(text: str, needle: str, after: int = 0) -> Optional[int]:
    """The first line (1-based) at or after line ``after`` that holds ``needle``."""
    for number, line in enumerate(text.splitlines(), 1):
        if number >= after and needle in line:
            return number
    return None


# --- Ansible INI

_INI_SECTION = re.compile(r'^\[([^\]:]+(?:\[[^\]]*\][^\]:]*)*)(?::(\w+))?\]\s*$')


def parse_ini(text: str, path: str = '<string>') -> Inventory:
    """An Ansible INI inventory, as Ansible reads it.

    Hosts before any section are ungrouped; ``[g:vars]`` values are strings,
    inline host variables Python literals (else strings); ``host:port``
    sets the port, after a range too (``web[01:20]:2222``; an IPv6
    address in brackets, ``[2001:db8::7]:2222``), unless ``ansible_port`` is
    set on the line.
    """
    inv = Inventory(path)
    group, kind = 'ungrouped', 'hosts'
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in '#;':
            continue
        # (A host line may start with an IPv6 address: [2001:db8::1]:2222.)
        if line.startswith('[') and not is_ipv6_address(line[1:].partition(']')[0]):
            match = re.match(r'^\[([^:\]]+)(?::([^\]]+))?\]\s*(?:[#;].*)?$', line)
            if match is None:
                raise InventoryError(path, 'malformed section header %r' % line, number)
            group, kind = match.group(1).strip(), (match.group(2) or 'hosts').strip()
            if kind not in ('hosts', 'vars', 'children'):
                raise InventoryError(path, 'unknown section kind %r in %r (children or vars)'
                                     % (kind, line), number, kind)
            if not re.match(r'^[A-Za-z0-9_.-]+$', group):
                raise InventoryError(path, 'bad group name %r' % group, number, group)
            inv.group(group, number)
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise InventoryError(path, 'cannot read %r: %s' % (line, exc), number) from None
        if not words:
            continue
        if kind == 'vars':
            key, sep, value = line.partition('=')
            if not sep or not key.strip():
                raise InventoryError(path, 'expected key=value in [%s:vars], not %r'
                                     % (group, line), number)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in '"\'':
                value = value[1:-1]
            inv.group(group).vars[key.strip()] = value
        elif kind == 'children':
            if len(words) != 1:
                raise InventoryError(path, 'expected one group name in [%s:children], not %r'
                                     % (group, line), number)
            inv.add_child(group, words[0], number)
        else:
            name, variables = words[0], {}
            for word in words[1:]:
                key, sep, value = word.partition('=')
                if not sep or not key:
                    raise InventoryError(path, 'expected key=value after host %r, not %r'
                                         % (name, word), number, name)
                variables[key] = _ini_value(value)
            name, variables = _host_port(path, name, variables, number)
            for host in _expand(path, name, number):
                inv.add_host(host, group if group != 'ungrouped' else None, variables, number)
    return inv


def _ini_value(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


# --- Ansible YAML

_YAML_GROUP_KEYS = ('hosts', 'children', 'vars')


def parse_yaml(text: str, path: str = '<string>') -> Inventory:
    """An Ansible YAML inventory: top-level groups (usually ``all``), each a
    mapping of ``hosts`` (name -> variables or nothing), ``children``
    (name -> group) and ``vars``.  A host named ``name:port`` sets its
    port, as in INI."""
    import yaml  # type: ignore[import-untyped]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        raise InventoryError(path, 'not valid YAML: %s' % getattr(exc, 'problem', exc),
                             mark.line + 1 if mark is not None else None) from None
    inv = Inventory(path)
    if data is None:
        return inv
    if not isinstance(data, dict):
        raise InventoryError(path, 'expected a mapping of groups at the top, not %s'
                             % type(data).__name__, 1)
    for name, body in data.items():
        _yaml_group(inv, text, str(name), body, None)
    return inv


def _yaml_group(inv: Inventory, text: str, name: str, body: Any, parent: Optional[str]) -> None:
    path = inv.path
    line = _line_of(text, name + ':')
    group = inv.group(name, line)
    if parent is not None and parent != 'all':
        inv.add_child(parent, name, line)
    if body is None:
        return
    if not isinstance(body, dict):
        raise InventoryError(path, 'group %r: expected a mapping with hosts, children or vars, '
                             'not %s' % (name, type(body).__name__), line, name)
    for key in body:
        if key not in _YAML_GROUP_KEYS:
            raise InventoryError(path, 'group %r: unknown key %r (hosts, children or vars)'
                                 % (name, key), _line_of(text, str(key) + ':', line or 0), str(key))
    hosts = body.get('hosts') or {}
    if isinstance(hosts, list):  # not Ansible's shape, but plain to read
        hosts = {host: None for host in hosts}
    if not isinstance(hosts, dict):
        raise InventoryError(path, 'group %r: hosts must be a mapping' % name, line, name)
    for host, variables in hosts.items():
        host_line = _line_of(text, str(host), line or 0)
        if variables is not None and not isinstance(variables, dict):
            raise InventoryError(path, 'host %r: expected a mapping of variables' % host,
                                 host_line, str(host))
        host_name, host_vars = _host_port(path, str(host), variables or {}, host_line)
        for expanded in _expand(path, host_name, host_line):
            inv.add_host(expanded, name, host_vars, host_line)
    variables = body.get('vars') or {}
    if not isinstance(variables, dict):
        raise InventoryError(path, 'group %r: vars must be a mapping' % name, line, name)
    group.vars.update(variables)
    children = body.get('children') or {}
    if not isinstance(children, dict):
        raise InventoryError(path, 'group %r: children must be a mapping' % name, line, name)
    for child, child_body in children.items():
        _yaml_group(inv, text, str(child), child_body, name)


# --- chopsticks TOML

_TOML_TOP = ('vars', 'hosts', 'groups')
_TOML_HOST = SETTINGS + ('vars',)
_TOML_GROUP = SETTINGS + ('vars', 'hosts', 'children')


def parse_toml(text: str, path: str = '<string>') -> Inventory:
    """chopsticks' own format::

        [vars]                      # every host's
        user = "deploy"

        [hosts.web1]                # a host's tunnel settings, and its variables
        address = "10.0.0.1"
        port = 2222
        vars = { role = "frontend" }

        [groups.web]
        hosts = ["web1", "web[02:04]"]      # or a table: name -> settings
        vars = { http_port = 80 }
        become = true                       # settings at any level

        [groups.prod]
        children = ["web", "db"]

    Settings: ``address``, ``port``, ``user``, ``python``, ``transport``,
    ``via``, ``become``, ``become_user``, ``become_method``,
    ``become_password``, ``keepalive``, ``identity_file``,
    ``connect_timeout``, ``ssh_options``.  Any other key is an error.
    """
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r'line (\d+)', str(exc))
        raise InventoryError(path, 'not valid TOML: %s' % exc,
                             int(match.group(1)) if match else None) from None
    inv = Inventory(path)
    _check_keys(path, text, data, _TOML_TOP, 'the top level', None)
    inv.group('all').vars.update(_toml_vars(path, text, data, 'the top level', 0))
    for name, body in (data.get('hosts') or {}).items():
        line = _line_of(text, '[hosts.%s]' % name) or _line_of(text, name)
        _toml_host(inv, text, name, body, None, line)
    for name, body in (data.get('groups') or {}).items():
        line = _line_of(text, '[groups.%s]' % name) or _line_of(text, name)
        inv.group(name, line)
        if not isinstance(body, dict):
            raise InventoryError(path, 'group %r: expected a table' % name, line, name)
        _check_keys(path, text, body, _TOML_GROUP, 'group %r' % name, line)
        inv.group(name).vars.update(_toml_vars(path, text, body, 'group %r' % name, line))
        hosts = body.get('hosts') or []
        if isinstance(hosts, list):
            for host in hosts:
                _toml_host(inv, text, str(host), {}, name, line)
        elif isinstance(hosts, dict):
            for host, host_body in hosts.items():
                _toml_host(inv, text, str(host), host_body, name, line)
        else:
            raise InventoryError(path, 'group %r: hosts must be a list or a table' % name,
                                 line, name)
        for child in body.get('children') or []:
            inv.add_child(name, str(child), line)
    return inv


def _toml_host(inv: Inventory, text: str, name: str, body: Any, group: Optional[str],
               line: Optional[int]) -> None:
    if not isinstance(body, dict):
        raise InventoryError(inv.path, 'host %r: expected a table' % name, line, name)
    _check_keys(inv.path, text, body, _TOML_HOST, 'host %r' % name, line)
    variables = _toml_vars(inv.path, text, body, 'host %r' % name, line)
    for host in _expand(inv.path, name, line):
        inv.add_host(host, group, variables, line)


def _toml_vars(path: str, text: str, body: dict, what: str, line: Optional[int]) -> dict:
    variables = {key: body[key] for key in SETTINGS if key in body}
    extra = body.get('vars') or {}
    if not isinstance(extra, dict):
        raise InventoryError(path, '%s: vars must be a table' % what, line, 'vars')
    variables.update(extra)
    return variables


def _check_keys(path: str, text: str, body: dict, allowed: Sequence[str], what: str,
                line: Optional[int]) -> None:
    for key in body:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = ' (did you mean %r?)' % close[0] if close else ''
            where = _line_of(text, key, line or 0)
            raise InventoryError(path, '%s: unknown key %r%s; variables go in a vars table'
                                 % (what, key, hint), where, key)

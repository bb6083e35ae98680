"""Inventories: a fleet described once, in a file, with groups and per-host settings.

    from chopsticks import inventory
    inv = inventory.load('hosts.toml')     # or an Ansible INI or YAML inventory, as it is
    inv.select('web:&prod:!web3')          # a chopsticks.Group
    inv.vars('web1')                       # the host's merged variables
    inv.tunnel('web1')                     # the host's tunnel

Three formats, told apart by the file's extension (``.toml``; ``.yml`` or
``.yaml``; anything else is INI, as Ansible's default ``hosts`` file):

- chopsticks' own TOML (see :func:`chopsticks.inventory_formats.parse_toml`
  for its keys);
- Ansible's INI: ``[group]``, ``[group:children]``, ``[group:vars]``, inline
  host variables (Python literals, as Ansible reads them), ranges
  ``web[01:20]`` and ``db-[a:c]``;
- Ansible's YAML: ``all: {hosts: ..., children: ..., vars: ...}``.

Variables merge as Ansible merges them: ``all`` < parent groups < child
groups (groups at one depth in name order) < the host.  The tunnel settings
are variables too, under chopsticks' names or Ansible's: ``address``
(``ansible_host``), ``port`` (``ansible_port``), ``user`` (``ansible_user``),
``python`` (``ansible_python_interpreter``), ``identity_file``
(``ansible_ssh_private_key_file``), ``transport`` (``ansible_connection``:
``ssh``, ``paramiko`` or ``local``), ``via`` (an inventory host or a host
string), ``become`` (``ansible_become``), ``become_user``
(``ansible_become_user``), ``become_method`` (``sudo``, ``su``, ``doas``),
``become_password`` (``ansible_become_password``), ``keepalive``,
``connect_timeout`` (``ansible_timeout``) and ``ssh_options`` (a table of
ssh_config options; Ansible's ``ansible_ssh_common_args`` ``-o`` options).

Patterns follow Ansible's language: ``web:db`` or ``web,db`` (union),
``web:&prod`` (intersection), ``web:!web3`` (exclusion), globs ``web*``
over group and host names, ``~regex``, ``all`` (also ``*``).

Errors (:class:`InventoryError`) name the file, the line when the format
gives one, and the name at fault.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
import shlex
import string
from typing import Any, Dict, Iterator, List, Optional, Set

from .errors import ChopsticksError

__all__ = ['Inventory', 'InventoryError', 'load', 'loads', 'expand_range']

# Tunnel settings under chopsticks' names, and the Ansible names mapped onto them.
SETTINGS = ('address', 'port', 'user', 'python', 'transport', 'via', 'become', 'become_user',
            'become_method', 'become_password', 'keepalive', 'identity_file',
            'connect_timeout', 'ssh_options')
ANSIBLE_NAMES = {
    'address': ('ansible_host', 'ansible_ssh_host'),
    'port': ('ansible_port', 'ansible_ssh_port'),
    'user': ('ansible_user', 'ansible_ssh_user'),
    'python': ('ansible_python_interpreter',),
    'identity_file': ('ansible_ssh_private_key_file', 'ansible_private_key_file'),
    'transport': ('ansible_connection',),
    'become': ('ansible_become',),
    'become_user': ('ansible_become_user',),
    'become_method': ('ansible_become_method',),
    'become_password': ('ansible_become_password', 'ansible_become_pass'),
    'connect_timeout': ('ansible_timeout',),
}


class InventoryError(ChopsticksError, ValueError):
    """An inventory could not be read, or a pattern names nothing in it.

    ``path``, ``line`` (1-based, or None) and ``name`` (the group, host or
    key at fault, or None) are also attributes.
    """

    def __init__(self, path: str, message: str, line: Optional[int] = None,
                 name: Optional[str] = None):
        self.path = path
        self.line = line
        self.name = name
        where = path if line is None else '%s:%d' % (path, line)
        super().__init__('%s: %s' % (where, message))


# --- ranges -----------------------------------------------------------------------------

_SUBSCRIPT = re.compile(r'^(.+)\[(-?\d*)(:)?(-?\d*)\]$')  # a group's hosts by position
_RANGE = re.compile(r'\[([0-9a-zA-Z]+):([0-9a-zA-Z]+)(?::([0-9]+))?\]')


def expand_range(pattern: str) -> List[str]:
    """``web[01:03]`` -> web01, web02, web03; ``db-[a:c]`` -> db-a, db-b, db-c;
    ``[1:9:2]`` steps; several ranges in one name multiply."""
    match = _RANGE.search(pattern)
    if match is None:
        return [pattern]
    start, end, step = match.group(1), match.group(2), int(match.group(3) or 1)
    if step < 1:
        raise ValueError('bad range step in %r' % pattern)
    if start.isdigit() and end.isdigit():
        width = len(start) if start.startswith('0') and len(start) > 1 else 0
        if int(start) > int(end):
            raise ValueError('range %r runs backwards' % match.group(0))
        values = [str(n).zfill(width) for n in range(int(start), int(end) + 1, step)]
    elif len(start) == 1 and len(end) == 1 and start.isalpha() and end.isalpha():
        letters = string.ascii_letters
        if letters.index(start) > letters.index(end):
            raise ValueError('range %r runs backwards' % match.group(0))
        values = list(letters[letters.index(start):letters.index(end) + 1:step])
    else:
        raise ValueError('bad range %r (numbers [01:20] or letters [a:f])' % match.group(0))
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [head + value + rest for value in values for rest in expand_range(tail)]


# --- the model ----------------------------------------------------------------------------

class _GroupDef(object):
    __slots__ = ('name', 'vars', 'hosts', 'children', 'line')

    def __init__(self, name: str, line: Optional[int] = None):
        self.name = name
        self.vars: Dict[str, Any] = {}
        self.hosts: List[str] = []
        self.children: List[str] = []
        self.line = line


class Inventory(object):
    """Hosts, groups and variables read from one file (see :func:`load`)."""

    def __init__(self, path: str):
        self.path = path
        self.host_vars: Dict[str, Dict[str, Any]] = {}  # in the order hosts were met
        self.groups: Dict[str, _GroupDef] = {}
        self._lines: Dict[str, int] = {}  # where a host or group was first named
        self._tunnels: Dict[str, Any] = {}
        self._building: List[str] = []  # hosts whose tunnel is being made (a via cycle)
        self.group('all')

    # --- building (the parsers)
    def group(self, name: str, line: Optional[int] = None) -> _GroupDef:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = _GroupDef(name, line)
        return group

    def add_host(self, name: str, group: Optional[str] = None, variables: Optional[dict] = None,
                 line: Optional[int] = None) -> None:
        if name not in self.host_vars:
            self.host_vars[name] = {}
            if line is not None:
                self._lines[name] = line
        self.host_vars[name].update(variables or {})
        if group is not None and group != 'all':
            members = self.group(group, line).hosts
            if name not in members:
                members.append(name)

    def add_child(self, parent: str, child: str, line: Optional[int] = None) -> None:
        children = self.group(parent, line).children
        self.group(child, line)
        if child not in children:
            children.append(child)

    def finish(self) -> 'Inventory':
        """Check the groups (no cycles), and fill ``ungrouped``."""
        for name in self.groups:
            self._check_cycle(name, [])
        grouped: Set[str] = set()
        for group in self.groups.values():
            if group.name not in ('all', 'ungrouped'):
                grouped.update(group.hosts)
        ungrouped = self.group('ungrouped')
        for host in self.host_vars:
            if host not in grouped and host not in ungrouped.hosts:
                ungrouped.hosts.append(host)
        return self

    def _check_cycle(self, name: str, path: List[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            raise InventoryError(self.path, 'groups form a cycle: %s' % ' -> '.join(cycle),
                                 self.groups[name].line, name)
        for child in self.groups[name].children:
            self._check_cycle(child, path + [name])

    # --- reading
    @property
    def hosts(self) -> List[str]:
        """Every host, in the order the file names them."""
        return list(self.host_vars)

    def has_host(self, name: str) -> bool:
        return name in self.host_vars

    def __contains__(self, name: object) -> bool:
        return name in self.host_vars

    def __iter__(self) -> Iterator[str]:
        return iter(self.host_vars)

    def __len__(self) -> int:
        return len(self.host_vars)

    def __repr__(self) -> str:
        return '<Inventory %s: %d hosts, %d groups>' % (self.path, len(self.host_vars),
                                                       len(self.groups))

    def group_hosts(self, name: str) -> List[str]:
        """The hosts of group ``name`` and of its children, in inventory order."""
        if name == 'all':
            return self.hosts
        members: Set[str] = set()
        stack = [name]
        seen = set()
        while stack:
            group = self.groups[stack.pop()]
            if group.name in seen:
                continue
            seen.add(group.name)
            members.update(group.hosts)
            stack.extend(group.children)
        return [host for host in self.host_vars if host in members]

    def groups_of(self, host: str) -> List[str]:
        """The groups ``host`` belongs to, directly or through children, ``all`` first."""
        return [name for name in self.groups if host in self.group_hosts(name)]

    def _depths(self) -> Dict[str, int]:
        """Each group's depth below ``all`` (its longest path from it), as Ansible counts."""
        depths = {'all': 0}
        parents: Dict[str, List[str]] = {}
        for group in self.groups.values():
            for child in group.children:
                parents.setdefault(child, []).append(group.name)

        def depth(name: str) -> int:
            if name not in depths:
                depths[name] = 1 + max([depth(p) for p in parents.get(name, [])] or [0])
            return depths[name]
        for name in self.groups:
            depth(name)
        return depths

    def vars(self, host: str) -> Dict[str, Any]:
        """``host``'s variables: all < parent groups < child groups < the host,
        plus ``inventory_hostname`` and ``group_names``."""
        self._known_host(host)
        depths = self._depths()
        groups = sorted(self.groups_of(host), key=lambda name: (depths[name], name))
        merged: Dict[str, Any] = {}
        for name in groups:
            merged.update(self.groups[name].vars)
        merged.update(self.host_vars[host])
        merged['inventory_hostname'] = host
        merged['group_names'] = sorted(g for g in groups if g not in ('all', 'ungrouped'))
        return merged

    def settings(self, host: str) -> Dict[str, Any]:
        """``host``'s tunnel settings, under chopsticks' names (see the module docstring)."""
        variables = self.vars(host)
        settings: Dict[str, Any] = {}
        for key in SETTINGS:
            for name in (key,) + ANSIBLE_NAMES.get(key, ()):
                if name in variables:
                    settings[key] = variables[name]
                    break
        options = dict(settings.get('ssh_options') or {})
        for name in ('ansible_ssh_common_args', 'ansible_ssh_extra_args'):
            if name in variables:
                options.update(_ssh_o_options(str(variables[name])))
        if options:
            settings['ssh_options'] = options
        return settings

    def tunnel(self, host: str) -> Any:
        """The tunnel that reaches ``host`` (one per host and inventory), named ``host``."""
        tunnel = self._tunnels.get(host)
        if tunnel is None:
            if host in self._building:
                chain = self._building[self._building.index(host):] + [host]
                raise InventoryError(self.path, 'via forms a cycle: %s' % ' -> '.join(chain),
                                     self._lines.get(host), host)
            self._building.append(host)
            try:
                tunnel = self._tunnels[host] = self._make_tunnel(host)
            finally:
                self._building.pop()
        return tunnel

    def _make_tunnel(self, host: str) -> Any:
        from . import tunnel as tunnels
        settings = self.settings(host)
        common: Dict[str, Any] = {}
        if settings.get('python'):
            common['python'] = str(settings['python'])
        for key in ('keepalive', 'connect_timeout'):
            if settings.get(key) is not None:
                common[key] = float(settings[key])
        via = settings.get('via')
        if via:
            common['via'] = self._via(host, str(via))
        transport = str(settings.get('transport') or 'ssh')
        tunnel: tunnels.BaseTunnel
        if transport == 'local':
            tunnel = tunnels.Local(host, **common)
        elif transport in ('ssh', 'openssh', 'paramiko', 'smart'):
            options = dict(settings.get('ssh_options') or {})
            if settings.get('identity_file'):
                options['IdentityFile'] = os.path.expanduser(str(settings['identity_file']))
            port = settings.get('port')
            tunnel = tunnels.SSHTunnel(
                str(settings.get('address') or host), user=settings.get('user') or None,
                port=int(str(port)) if port not in (None, '') else None,
                transport='paramiko' if transport == 'paramiko' else 'openssh',
                **common, **options)
            tunnel.host = host  # named as the inventory names it, not by its address
        else:
            raise InventoryError(self.path, 'host %r: transport %r is not one chopsticks has '
                                 '(ssh, paramiko, local)' % (host, transport),
                                 self._lines.get(host), host)
        if _true(settings.get('become')):
            from .become import become
            method = str(settings.get('become_method') or 'sudo')
            if method not in ('sudo', 'su', 'doas'):
                raise InventoryError(self.path, 'host %r: become_method %r is not one chopsticks '
                                     'has (sudo, su, doas)' % (host, method),
                                     self._lines.get(host), host)
            tunnel = become(tunnel, str(settings.get('become_user') or 'root'),
                            password=settings.get('become_password'), method=method)
        return tunnel

    def _via(self, host: str, via: str) -> Any:
        if via in self.host_vars:
            return self.tunnel(via)
        from . import plugins
        try:
            return plugins.tunnel_from_url(via)
        except (ValueError, TypeError) as exc:
            raise InventoryError(self.path, 'host %r: bad via %r: %s' % (host, via, exc),
                                 self._lines.get(host), via) from None

    # --- patterns
    def host_names(self, pattern: str) -> List[str]:
        """The hosts ``pattern`` selects, in inventory order (Ansible's language)."""
        pattern = pattern.strip()
        if not pattern:
            raise InventoryError(self.path, 'empty host pattern')
        terms = [t.strip() for t in (pattern.split(',') if ',' in pattern
                                     else _split_colons(pattern)) if t.strip()]
        # As Ansible: unions first, then intersections, then exclusions.
        unions = [t for t in terms if t[0] not in '&!']
        intersections = [t[1:] for t in terms if t[0] == '&']
        exclusions = [t[1:] for t in terms if t[0] == '!']
        selected: Set[str] = set()
        for term in unions or ['all']:
            selected.update(self._term(term))
        for term in intersections:
            selected.intersection_update(self._term(term))
        for term in exclusions:
            selected.difference_update(self._term(term))
        return [host for host in self.host_vars if host in selected]

    def select(self, pattern: str) -> Any:
        """A :class:`chopsticks.Group` of the hosts ``pattern`` selects."""
        from .group import Group
        return Group([self.tunnel(host) for host in self.host_names(pattern)])

    def _term(self, term: str) -> Set[str]:
        if term in ('all', '*'):
            return set(self.host_vars)
        if term in self.groups:
            return set(self.group_hosts(term))
        if term in self.host_vars:
            return {term}
        subscript = _SUBSCRIPT.match(term)
        if subscript and subscript.group(1) in self.groups:
            return self._subscript(term, subscript)
        if term.startswith('~'):
            try:
                regex = re.compile(term[1:])
            except re.error as exc:
                raise InventoryError(self.path, 'bad regex in pattern %r: %s' % (term, exc),
                                     name=term) from None
            return self._matching(lambda name: regex.match(name) is not None)
        if any(c in term for c in '*?['):
            found = self._matching(lambda name: fnmatch.fnmatchcase(name, term))
            if found:
                return found
            try:
                expanded = expand_range(term)  # web[01:03] names hosts too
            except ValueError:
                expanded = []
            if expanded != [term] and all(h in self.host_vars for h in expanded):
                return set(expanded)
            return set()
        close = difflib.get_close_matches(term, list(self.groups) + list(self.host_vars), n=3)
        hint = ' (did you mean %s?)' % ', '.join(close) if close else ''
        raise InventoryError(self.path, 'no group or host named %r%s' % (term, hint), name=term)

    def _subscript(self, term: str, match: Any) -> Set[str]:
        """``web[0]``, ``web[-1]``, ``web[1:]``, ``web[0:2]`` (end excluded), as Ansible."""
        hosts = self.group_hosts(match.group(1))
        start, colon, end = match.group(2), match.group(3), match.group(4)
        if colon is None:
            index = int(start)
            if not -len(hosts) <= index < len(hosts):
                raise InventoryError(self.path, 'pattern %r: group %r has %d hosts'
                                     % (term, match.group(1), len(hosts)), name=term)
            return {hosts[index]}
        return set(hosts[int(start) if start else None:int(end) if end else None])

    def _matching(self, test: Any) -> Set[str]:
        found: Set[str] = set()
        for name in self.groups:
            if test(name):
                found.update(self.group_hosts(name))
        found.update(host for host in self.host_vars if test(host))
        return found

    def _known_host(self, host: str) -> None:
        if host not in self.host_vars:
            close = difflib.get_close_matches(host, list(self.host_vars), n=3)
            hint = ' (did you mean %s?)' % ', '.join(close) if close else ''
            raise InventoryError(self.path, 'no host named %r%s' % (host, hint), name=host)


def _split_colons(pattern: str) -> List[str]:
    """Split on ':' except inside a range (``web[01:03]``)."""
    terms, depth, current = [], 0, ''
    for char in pattern:
        if char == '[':
            depth += 1
        elif char == ']':
            depth -= 1
        if char == ':' and depth == 0:
            terms.append(current)
            current = ''
        else:
            current += char
    terms.append(current)
    return terms


def _true(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ('1', 'true', 'yes', 'on', 'y')
    return bool(value)


def _ssh_o_options(args: str) -> Dict[str, str]:
    """``-o Key=Value`` and ``-o Key Value`` options of an ssh command line."""
    words = shlex.split(args)
    options = {}
    for flag, value in zip(words, words[1:]):
        if flag == '-o':
            key, sep, rest = value.partition('=')
            if not sep:
                key, _, rest = value.partition(' ')
            options[key.strip()] = rest.strip()
    for word in words:
        if word.startswith('-o') and len(word) > 2:
            key, _, rest = word[2:].partition('=')
            options[key.strip()] = rest.strip()
    return options


# --- loading ---------------------------------------------------------------------------------

def load(path: str, format: Optional[str] = None) -> Inventory:
    """Read the inventory at ``path``: ``format`` is ``'toml'``, ``'ini'`` or
    ``'yaml'``, else told by the extension (``.toml``, ``.yml``/``.yaml``,
    anything else INI)."""
    path = os.fspath(path)
    with open(path, encoding='utf-8') as f:
        text = f.read()
    return loads(text, format or _format_of(path), path)


def loads(text: str, format: str, path: str = '<string>') -> Inventory:
    """Parse inventory ``text`` in ``format`` (``'toml'``, ``'ini'``, ``'yaml'``)."""
    from . import inventory_formats as formats  # it builds on this module's Inventory
    parsers = {'toml': formats.parse_toml, 'ini': formats.parse_ini,
               'yaml': formats.parse_yaml, 'yml': formats.parse_yaml}
    if format not in parsers:
        raise ValueError('unknown inventory format %r (toml, ini or yaml)' % format)
    return parsers[format](text, path).finish()


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {'.toml': 'toml', '.yml': 'yaml', '.yaml': 'yaml'}.get(ext, 'ini')

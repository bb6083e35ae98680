"""docs/CONTRACTS.md, the map of the code, stays true."""
import os
import re

import chopsticks
from chopsticks import connection, dispatch, transport

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP = open(os.path.join(ROOT, 'docs', 'CONTRACTS.md'), encoding='utf-8').read()
PACKAGE = os.path.dirname(chopsticks.__file__)


def mapped_modules():
    return set(re.findall(r'^\| `([\w/]+(?:\.py)?)` \|', MAP, flags=re.M))


def test_every_module_is_on_the_map_and_every_mapped_module_exists():
    on_disk = {name for name in os.listdir(PACKAGE) if name.endswith('.py')}
    on_disk |= {name + '/' for name in os.listdir(PACKAGE)
                if os.path.isfile(os.path.join(PACKAGE, name, '__init__.py'))}
    mapped = mapped_modules()
    assert on_disk - mapped == set(), 'modules missing from docs/CONTRACTS.md'
    assert mapped - on_disk == set(), 'docs/CONTRACTS.md names modules that do not exist'


def test_the_interfaces_the_map_names_exist():
    assert hasattr(transport, 'Transport') and hasattr(transport, 'DirectReading')
    assert hasattr(transport, 'Capabilities')
    assert hasattr(connection, 'CallChannel') and hasattr(dispatch, 'GroupTunnel')
    from chopsticks.relay import RelayConnection
    entry = re.search(r'^- `chopsticks\.connection\.CallChannel`.*?\n(?=- |\n)', MAP,
                      flags=re.S | re.M).group(0)
    named = entry.split('):', 1)[1]  # after "(`Connection`, `relay.RelayConnection`)"
    methods = re.findall(r'`(\w+)`', named)
    assert 'call_then' in methods
    for cls in (connection.Connection, RelayConnection):
        missing = [m for m in methods if not hasattr(cls, m) and m not in ('host', 'closed', 'remote')]
        assert missing == [], '%s lacks %s' % (cls.__name__, missing)

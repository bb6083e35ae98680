"""What the real-packages import row calls on the host: it imports a varied
set of released PyPI packages (bench/fixtures.py REAL_PACKAGES_*) that the
host lacks.  Among what they import: optional dependencies absent everywhere
(``try: import simplejson``, brotli, zstandard, socks, charset_normalizer),
C speedups with pure fallbacks (markupsafe, PyYAML), ``sys.platform`` and
version branches, imports inside functions (click, rich), and lazily loaded
modules (pygments' lexers).  Stdlib only at the top: it travels to the host.
"""

TOP_LEVEL = ('requests', 'urllib3', 'idna', 'certifi', 'jinja2', 'markupsafe', 'yaml', 'click',
             'attr', 'attrs', 'packaging', 'pygments', 'rich', 'dateutil', 'six', 'tomli')


def import_all():
    """Import the set and use a little of it; return how many modules it loaded."""
    import sys
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # requests: no character detection library
        import requests
    import attrs
    import click
    import dateutil.parser
    import dateutil.relativedelta
    import dateutil.tz
    import jinja2
    import packaging.requirements
    import packaging.specifiers
    import packaging.version
    import pygments.formatters.terminal
    import pygments.lexers.python
    import rich.console
    import rich.syntax
    import rich.table
    import six
    import tomli
    import yaml
    jinja2.Template('{{ x }}').render(x=requests.codes.ok)
    yaml.safe_load('a: [1, 2]')
    packaging.requirements.Requirement('chopsticks>=2; python_version>"3.6"')
    dateutil.parser.parse('2026-12-06T21:00:00Z')
    tomli.loads('a = 1')
    six.moves.urllib.parse.quote('a b')
    attrs.define(type('Point', (), {'__annotations__': {'x': int}}))
    click.style('x', fg='red')
    return sum(1 for name, module in list(sys.modules.items())
               if name.partition('.')[0] in TOP_LEVEL
               and getattr(module, '__name__', None) == name)


def requests_made():
    """How many requests (imports, data files) a chopsticks agent sent its controller."""
    import sys
    agent = getattr(sys.modules.get('_chopsticks_agent'), 'agent', None)
    return agent.next_request if agent is not None else None

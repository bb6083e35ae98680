"""The remote import hook: the remote imports what only the controller has."""
import os
import sys
import textwrap
import zipfile

import pytest

from chopsticks import Local, RemoteException
from chopsticks.modserver import ModuleServer
from chopsticks import codec
import zlib


def write(path, text=''):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A package tree that only the controller has on sys.path."""
    root = tmp_path / 'controller_path'
    # The user shares this package's files (data) with hosts: see ServePolicy.
    monkeypatch.setenv('CHOPSTICKS_SERVE', 'servedpkg,dynpkg,*')
    write(root / 'servedpkg' / '__init__.py', '''
        from . import sub
        from .sub import deeper
        import servedhelper
        VALUE = sub.VALUE + servedhelper.VALUE
    ''')
    write(root / 'servedpkg' / 'sub' / '__init__.py', 'VALUE = 1\n')
    write(root / 'servedpkg' / 'sub' / 'deeper.py', 'def where():\n    return __name__\n')
    write(root / 'servedpkg' / 'data' / 'hello.txt', 'hello data\n')
    write(root / 'servedpkg' / 'lazy.py', 'def f():\n    return "lazy"\n')
    write(root / 'servedhelper.py', 'VALUE = 41\n')
    write(root / 'nspkg' / 'portion.py', 'NAME = "namespace portion"\n')
    write(root / 'modfuncs.py', '''
        import sys

        def import_and_report():
            agent = sys.modules['_chopsticks_agent'].agent
            before = agent.finder.requests
            import servedpkg
            requests = agent.finder.requests - before
            import servedpkg.lazy
            return (servedpkg.VALUE, servedpkg.sub.deeper.where(), servedpkg.lazy.f(),
                    requests)

        def import_by_name(name, function):
            """What ``name.function()`` returns and how many requests the host sent."""
            import importlib
            agent = sys.modules['_chopsticks_agent'].agent
            before = agent.next_request
            value = getattr(importlib.import_module(name), function)()
            return value, agent.next_request - before

        def get_data():
            import pkgutil
            return pkgutil.get_data('servedpkg', 'data/hello.txt')

        def resources_files():
            import importlib.resources
            files = importlib.resources.files('servedpkg')
            names = sorted(p.name for p in files.iterdir())
            return files.joinpath('data').joinpath('hello.txt').read_text(), names

        def namespace():
            import nspkg.portion
            return nspkg.portion.NAME

        def zipped():
            import zpkg.mod, pkgutil
            return zpkg.mod.NAME, pkgutil.get_data('zpkg', 'res.txt')

        double = lambda x: 2 * x  # noqa: E731 (travels as source, not by reference)

        def import_requests_so_far():
            return sys.modules['_chopsticks_agent'].agent.finder.requests

        def served_ahead(name):
            return name in sys.modules['_chopsticks_agent'].agent.finder.modules

        def ask_controller(query):
            return sys.modules['_chopsticks_agent'].agent.request(query)

        def where_is(name):
            import importlib
            return importlib.import_module(name).WHERE
    ''')
    zip_path = tmp_path / 'zipped.zip'
    with zipfile.ZipFile(zip_path, 'w') as zf:
        zf.writestr('zpkg/__init__.py', '')
        zf.writestr('zpkg/mod.py', 'NAME = "from a zip"\n')
        zf.writestr('zpkg/res.txt', 'zip resource')
    monkeypatch.syspath_prepend(str(zip_path))
    monkeypatch.syspath_prepend(str(root))
    for name in list(sys.modules):
        if name.startswith(('servedpkg', 'modfuncs', 'nspkg', 'zpkg', 'servedhelper')):
            del sys.modules[name]
    import modfuncs
    return root, modfuncs


@pytest.fixture(params=['same', 'oldest'])
def tunnel(request):
    python = None
    if request.param == 'oldest':
        from conftest import available_pythons
        pythons = available_pythons()
        if not pythons:
            pytest.skip('no pyenv interpreters')
        python = pythons[0]
    t = Local(python=python)
    yield t
    t.close()


def test_what_own_code_imports_in_its_functions_comes_with_the_first_call(project, tunnel):
    _, modfuncs = project
    tunnel.connect()
    value, where, lazy, requests = tunnel.call(modfuncs.import_and_report)
    assert (value, where, lazy) == (42, 'servedpkg.sub.deeper', 'lazy')
    assert requests == 0


def test_package_and_its_closure_arrive_in_one_round_trip(project, tunnel):
    """A name known only at run time costs one request: the package comes
    with what it imports, its own lazy imports, and what it names of its data."""
    root, modfuncs = project
    write(root / 'dynpkg' / '__init__.py', '''
        import pkgutil
        from . import first
        from .second import VALUE

        def later():
            from . import third
            return third.VALUE + len(pkgutil.get_data(__name__, 'table.txt'))
    ''')
    write(root / 'dynpkg' / 'first.py', 'import servedhelper\n')
    write(root / 'dynpkg' / 'second.py', 'VALUE = 2\n')
    write(root / 'dynpkg' / 'third.py', 'VALUE = 3\n')
    write(root / 'dynpkg' / 'table.txt', 'four')
    assert tunnel.call(modfuncs.import_by_name, 'dynpkg', 'later') == (7, 1)


def test_the_first_call_into_own_code_brings_its_module(project, tunnel):
    """The module of a function the host cannot have (the user's own code)
    goes ahead of the first call into it: the agent imports it, and what it
    imports at the top, without asking the controller (a round trip)."""
    _, modfuncs = project
    tunnel.connect()  # (a first call sent with the connect goes before the agent
    #                   says which Python it runs: then the agent asks)
    assert tunnel.call(modfuncs.import_requests_so_far) == 0


def test_a_group_call_into_own_code_brings_its_module(project):
    from chopsticks import Group
    _, modfuncs = project
    group = Group([Local('first'), Local('second')])
    try:
        assert group.call(modfuncs.import_requests_so_far) == {'first': 0, 'second': 0}
    finally:
        group.close()


def test_a_module_sent_ahead_to_another_host_is_the_file_as_it_is_now(project):
    """Hosts that connect later get what was packed for the first from a cache,
    unless the file changed (a user editing a module between two runs of a
    long-lived controller)."""
    import importlib
    root, _ = project
    write(root / 'editme.py', 'def version():\n    return 1\n')
    sys.modules.pop('editme', None)
    import editme
    for name, expected in (('first', 1), ('second', 1), ('third', 2)):
        if expected == 2:
            write(root / 'editme.py', 'def version():\n    return 2\n')
            stat = os.stat(root / 'editme.py')
            os.utime(root / 'editme.py', ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
            importlib.reload(editme)
        with Local(name) as t:
            t.connect()
            assert t.call(editme.version) == expected
            assert t.call(lambda: sys.modules['_chopsticks_agent'].agent.finder.requests) == 0


def test_a_function_that_travels_as_source_does_not_bring_its_module(project, tunnel):
    _, modfuncs = project
    tunnel.connect()
    assert tunnel.call(modfuncs.double, 21) == 42
    assert not tunnel.call(lambda name: name in sys.modules['_chopsticks_agent'].agent.finder.modules,
                           'modfuncs')


def test_installed_libraries_are_not_sent_ahead(project):
    """A library installed here may be installed on the host as well:
    sending it unasked could cost more than the round trip it saves."""
    from packaging.utils import canonicalize_name  # in site-packages, with pytest
    _, modfuncs = project
    with Local() as t:
        assert t.call(canonicalize_name, 'Some_Name') == 'some-name'
        assert not t.call(modfuncs.served_ahead, 'packaging.utils')
        assert t.call(modfuncs.served_ahead, 'modfuncs')


def test_what_a_host_most_likely_lacks(chopsticks_plugin_manager):
    from chopsticks.modserver import host_lacks
    assert host_lacks('mine', '/home/me/project/mine.py')
    assert not host_lacks('yaml', '/venv/lib/python3.11/site-packages/yaml/__init__.py')
    assert not host_lacks('yaml', '/usr/lib/python3/dist-packages/yaml/__init__.py')
    # chopsticks and its plugins are never installed on hosts
    assert host_lacks('chopsticks.files', '/venv/lib/python3.11/site-packages/chopsticks/files.py')
    plugin_module = type(sys)('acme_facts.plugin')
    chopsticks_plugin_manager.register(plugin_module, name='acme')
    assert host_lacks('acme_facts.probes', '/venv/lib/python3.11/site-packages/acme_facts/probes.py')


def test_package_data_through_pkgutil(project, tunnel):
    assert tunnel.call(project[1].get_data) == b'hello data\n'


def test_package_data_through_importlib_resources(project, remote_python):
    with Local(python=remote_python) as tunnel:
        if tunnel.remote_info['version'] < (3, 9):
            pytest.skip('importlib.resources.files needs Python 3.9')
        text, names = tunnel.call(project[1].resources_files)
    assert text == 'hello data\n'
    assert {'__init__.py', 'sub', 'data', 'lazy.py'} <= set(names)


def test_namespace_package(project, tunnel):
    assert tunnel.call(project[1].namespace) == 'namespace portion'


def test_zip_import_and_zip_data(project, tunnel):
    assert tunnel.call(project[1].zipped) == ('from a zip', b'zip resource')


def test_remote_own_modules_win(project, tmp_path, monkeypatch):
    root, modfuncs = project
    write(root / 'shadowed.py', 'WHERE = "controller"\n')
    remote_dir = tmp_path / 'remote_only'
    write(remote_dir / 'shadowed.py', 'WHERE = "remote"\n')
    monkeypatch.setenv('PYTHONPATH', str(remote_dir))
    with Local() as t:
        assert t.call(modfuncs.where_is, 'shadowed') == 'remote'


def test_missing_module_is_an_import_error(project, tunnel):
    with pytest.raises(RemoteException) as info:
        tunnel.call(project[1].where_is, 'no_such_module_anywhere')
    assert info.value.type_name in ('ModuleNotFoundError', 'ImportError')


@pytest.mark.parametrize('query', [
    ('data', '/etc/passwd'),
    ('data', os.path.expanduser('~/.ssh/id_rsa')),
    ('module', '../../etc/passwd'),
    ('module', '/etc/passwd'),
    ('module', 'os.path/../../x'),
    ('list', '/'),
])
def test_hostile_remote_cannot_read_outside_served_packages(project, query):
    with Local() as t:
        t.call(project[1].get_data)  # servedpkg is now served to this remote
        reply = t.call(project[1].ask_controller, query)
    assert 'data' not in reply and not reply.get('modules')
    assert reply.get('error')


def test_data_request_cannot_escape_a_served_package(project, tmp_path):
    root, _ = project
    secret = tmp_path / 'secret.txt'
    secret.write_text('top secret')
    os.symlink(secret, root / 'servedpkg' / 'data' / 'link.txt')
    server = ModuleServer()
    assert server.serve_module('servedpkg')['modules']
    pkg_dir = str(root / 'servedpkg')

    def ask(path):
        return codec.decode(zlib.decompress(server.handle(('data', path))))
    assert ask(pkg_dir + '/data/hello.txt') == {'data': b'hello data\n'}
    for path in (pkg_dir + '/../../secret.txt', pkg_dir + '/data/link.txt', str(secret)):
        reply = ask(path)
        assert 'data' not in reply and 'not inside' in reply['error']


def test_c_extension_is_refused_with_a_reason():
    if not _has('_cffi_backend'):
        pytest.skip('no compiled extension module outside the stdlib to try')
    reply = codec.decode(zlib.decompress(ModuleServer().handle(('module', '_cffi_backend'))))
    assert 'compiled extension' in reply['errors']['_cffi_backend']
    assert not reply.get('modules')


def _has(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def test_same_version_remote_gets_compiled_modules(project, tunnel):
    """A remote of the controller's version skips compiling; others get source only."""
    _, modfuncs = project
    tunnel.call(modfuncs.import_and_report)
    has_code = tunnel.call(lambda name: __import__('sys').modules['_chopsticks_agent']
                           .agent.finder.modules[name][6] is not None, 'servedpkg.sub.deeper')
    same = tunnel.remote_info['version'][:2] == tuple(sys.version_info[:2])
    assert has_code is same


def test_package_from_an_editable_install_is_served(tmp_path, monkeypatch):
    """An editable install's finder maps a name to a directory that is not on
    sys.path; the package the controller imported from there is still served."""
    import importlib.util
    src = tmp_path / 'src_outside_sys_path' / 'editablepkg'
    write(src / '__init__.py', 'from .impl import answer\n')
    write(src / 'impl.py', 'def answer():\n    return 42\n')
    spec = importlib.util.spec_from_file_location(
        'editablepkg', str(src / '__init__.py'), submodule_search_locations=[str(src)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, 'editablepkg', module)
    spec.loader.exec_module(module)
    with Local() as t:
        assert t.call(module.answer) == 42


OPTIONAL_IMPORTS = '''
    import sys
    try:
        import absent_everywhere
    except ImportError:
        absent_everywhere = None
    if sys.platform == 'win32':
        import absent_platform_module
    try:
        import msvcrt  # the stdlib's, on Windows only
    except ImportError:
        msvcrt = None
    try:
        import host_only
    except ImportError:
        host_only = None
    for name in ('absent_json_a', 'absent_json_b'):  # as requests picks a library
        try:
            __import__(name)
        except ImportError:
            pass

    def optional_in_function():
        try:
            from absent_in_function import thing
        except ImportError:
            return 'fallback'
        return thing

    def report():
        return (absent_everywhere, msvcrt, getattr(host_only, 'WHERE', None),
                optional_in_function())
'''


def test_optional_imports_absent_everywhere_cost_no_round_trip(project, tunnel):
    """What a package imports under try/except ImportError, behind a platform
    test or inside a function, and that nobody has: the reply that brings the
    package says so, and the host's ImportError still reaches the user's try."""
    root, modfuncs = project
    write(root / 'optpkg' / '__init__.py', OPTIONAL_IMPORTS)
    assert tunnel.call(modfuncs.import_by_name, 'optpkg', 'report') == (
        (None, None, None, 'fallback'), 1)
    asked = tunnel.call(modfuncs.import_requests_so_far)
    with pytest.raises(RemoteException) as info:
        tunnel.call(modfuncs.where_is, 'absent_everywhere')
    assert info.value.type_name == 'ModuleNotFoundError'
    assert tunnel.call(modfuncs.import_requests_so_far) == asked  # told, not asked again


def test_a_name_the_controller_lacks_is_still_imported_from_the_host(project, tmp_path,
                                                                     monkeypatch):
    root, modfuncs = project
    write(root / 'optpkg' / '__init__.py', OPTIONAL_IMPORTS)
    remote_dir = tmp_path / 'remote_only'
    write(remote_dir / 'host_only.py', 'WHERE = "remote"\n')
    monkeypatch.setenv('PYTHONPATH', str(remote_dir))
    with Local() as t:
        assert t.call(modfuncs.import_by_name, 'optpkg', 'report') == (
            (None, None, 'remote', 'fallback'), 1)


def test_a_namespace_package_takes_portions_from_host_and_controller(project, tmp_path,
                                                                     monkeypatch):
    root, modfuncs = project
    write(root / 'nsmix' / 'controller_part.py', 'WHERE = "controller"\n')
    remote_dir = tmp_path / 'remote_only'
    write(remote_dir / 'nsmix' / 'host_part.py', 'WHERE = "remote"\n')
    monkeypatch.setenv('PYTHONPATH', str(remote_dir))
    with Local() as t:
        assert t.call(modfuncs.where_is, 'nsmix.host_part') == 'remote'
        assert t.call(modfuncs.where_is, 'nsmix.controller_part') == 'controller'


def test_code_too_new_for_the_hosts_python_says_so(project):
    """A module the controller serves that this host's Python cannot compile
    (an assignment expression, for Python 3.7): the SyntaxError says what
    came from where and which Python the host runs."""
    from conftest import available_pythons
    old = [p for p in available_pythons() if p.endswith(('3.6', '3.7'))]
    if not old:
        pytest.skip('no pyenv Python 3.6 or 3.7')
    root, modfuncs = project
    write(root / 'newsyntax.py', 'def where():\n    return (found := "here")\n')
    with Local(python=old[0]) as t:
        with pytest.raises(RemoteException) as info:
            t.call(modfuncs.where_is, 'newsyntax')
    assert info.value.type_name == 'SyntaxError'
    assert 'newsyntax comes from the controller, and this host runs Python 3.' in info.value.msg

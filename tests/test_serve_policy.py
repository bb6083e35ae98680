"""What the import server hands a host (modserver.ServePolicy): modules by
name, package data only when a distribution ships it or the user named the
package, never a dot file; CHOPSTICKS_SERVE limits or switches it off.

The remote functions here are nested, so they travel as source: the host
does not need to import this test module (which a limited policy refuses)."""
import os
import sys
import textwrap

import pytest

from chopsticks import Local, RemoteException, modserver, servepolicy


def write(path, text=''):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project beside their script: a package with secrets in it,
    a module of secrets beside it, and an installed distribution."""
    root = tmp_path / 'script_dir'
    write(root / 'myproj' / '__init__.py', 'NAME = "myproj"\n')
    write(root / 'myproj' / '.env', 'DB_PASSWORD=hunter2\n')
    write(root / 'myproj' / '.git' / 'config', '[remote]\n')
    write(root / 'myproj' / 'settings' / '__init__.py', '')
    write(root / 'myproj' / 'settings' / 'credentials.json', '{"token": "s3cret"}\n')
    write(root / 'myproj' / 'templates' / 'motd.txt', 'welcome\n')
    write(root / 'local_secrets.py', 'API_KEY = "abc"\n')
    # An installed distribution: its RECORD lists what it ships.
    site = tmp_path / 'site'
    write(site / 'shippedpkg' / '__init__.py', '')
    write(site / 'shippedpkg' / 'data.txt', 'shipped data\n')
    write(site / 'shippedpkg' / 'extra.json', '{"planted": true}\n')
    write(site / 'shippedpkg' / '.env', 'PLANTED=1\n')
    write(site / 'shippedpkg-1.0.dist-info' / 'METADATA',
          'Metadata-Version: 2.1\nName: shippedpkg\nVersion: 1.0\n')
    write(site / 'shippedpkg-1.0.dist-info' / 'RECORD', ''.join(
        '%s,,\n' % name for name in ['shippedpkg/__init__.py', 'shippedpkg/data.txt',
                                      'shippedpkg/.env', 'shippedpkg-1.0.dist-info/RECORD']))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(servepolicy, '_shipped', None)  # read the RECORDs again
    monkeypatch.delenv(modserver.ENV_SERVE, raising=False)
    for name in [n for n in sys.modules if n.startswith(('myproj', 'local_secrets', 'shippedpkg'))]:
        del sys.modules[name]
    return root, site


def reader():
    def read(package, resource):
        import pkgutil
        try:
            return pkgutil.get_data(package, resource)
        except Exception as e:
            return 'refused: %s' % e
    return read


def lister():
    def listing(package):
        import importlib.resources

        def walk(entry, prefix=''):
            names = []
            for child in entry.iterdir():
                names.append(prefix + child.name)
                if child.is_dir():
                    names += walk(child, prefix + child.name + '/')
            return names
        return sorted(walk(importlib.resources.files(package)))
    return listing


def importer():
    def import_it(name):
        import importlib
        try:
            return getattr(importlib.import_module(name), '__name__')
        except ImportError as e:
            return 'refused: %s' % e
    return import_it


def test_default_policy_serves_modules_but_not_secret_files(project):
    root, _ = project
    read = reader()
    with Local('host') as t:
        assert t.call(importer(), 'myproj.settings') == 'myproj.settings'
        # A module beside the script is a module: a host may import it by name.
        assert t.call(importer(), 'local_secrets') == 'local_secrets'
        for resource in ['.env', '.git/config', 'settings/credentials.json', 'templates/motd.txt']:
            reply = t.call(read, 'myproj', resource)
            assert isinstance(reply, str) and reply.startswith('refused'), (resource, reply)
        assert 'CHOPSTICKS_SERVE' in t.call(read, 'myproj', 'templates/motd.txt')
        assert t.call(read, 'myproj', 'settings/__init__.py') == b''  # module source is fine
        if t.remote_info['version'] >= (3, 9):
            names = t.call(lister(), 'myproj')
            assert '.env' not in names and '.git' not in names
            assert 'settings/credentials.json' not in names
            assert 'settings/__init__.py' in names


def test_installed_distribution_data_is_what_it_ships(project):
    read = reader()
    with Local('host') as t:
        assert t.call(importer(), 'shippedpkg') == 'shippedpkg'
        assert t.call(read, 'shippedpkg', 'data.txt') == b'shipped data\n'
        for planted in ['extra.json', '.env']:  # .env: listed in RECORD, still a dot file
            reply = t.call(read, 'shippedpkg', planted)
            assert isinstance(reply, str) and reply.startswith('refused'), (planted, reply)


def test_named_packages_share_their_files_and_nothing_else(project, monkeypatch):
    monkeypatch.setenv('CHOPSTICKS_SERVE', 'myproj')
    read = reader()
    with Local('host') as t:
        assert t.call(importer(), 'myproj') == 'myproj'
        assert t.call(read, 'myproj', 'templates/motd.txt') == b'welcome\n'
        assert t.call(read, 'myproj', 'settings/credentials.json') == b'{"token": "s3cret"}\n'
        assert t.call(read, 'myproj', '.env').startswith('refused')
        refusal = t.call(importer(), 'local_secrets')
        assert refusal.startswith('refused') and 'CHOPSTICKS_SERVE' in refusal, refusal
        assert t.call(importer(), 'shippedpkg').startswith('refused')
        assert t.call(len, 'chopsticks itself still works') == 29


def test_serving_switched_off(project, monkeypatch):
    monkeypatch.setenv('CHOPSTICKS_SERVE', 'none')
    with Local('host') as t:
        assert t.call(importer(), 'myproj').startswith('refused')
        with pytest.raises(RemoteException):
            t.call(__import__, 'local_secrets')
        assert t.call(os.getpid) > 0


def test_repeated_closure_requests_reuse_the_packed_reply(project):
    """A relay's 'closure' request is packed once (it cost 90 ms each time),
    and packed again when a file changes."""
    root, _ = project
    first, second = modserver.ModuleServer(), modserver.ModuleServer()
    packed = first.handle(('closure', 'myproj'))
    assert second.handle(('closure', 'myproj')) is packed
    assert os.path.realpath(str(root / 'myproj')) in second.package_dirs
    write(root / 'myproj' / '__init__.py', 'NAME = "changed"\n')
    os.utime(str(root / 'myproj' / '__init__.py'), (1, 1))
    for key in list(modserver._closures):
        modserver._closures[key].checked = 0  # as if a second went by
    assert first.handle(('closure', 'myproj')) is not packed

"""The plugin system: hooks, registries, namespaces, tunnel URLs, fixtures.

Plugins here are real objects registered on a fresh plugin manager (the
``chopsticks_plugin_manager`` fixture); facts run on a real ``Local`` tunnel.
Installed distributions, entry points and the command line are tested in
``test_plugins_venv.py``.
"""
import inspect
import os
import re
import sys
from pathlib import Path

import pytest

import chopsticks
from chopsticks import hookspecs
from chopsticks.hookspecs import hookimpl
from chopsticks.hosts import tunnel_from_url
from chopsticks.plugins import (
    PluginError, PluginManager, PluginWarning, UnknownNameError, get_plugin_manager,
)

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["pytester"]


# -- plugins used by the tests (module level: the host imports facts by name) --


def answer():
    """The answer, computed on the host."""
    return 42


def pid():
    return os.getpid()


def make_marker(path, check=False):
    """A task: make sure a file exists."""
    changed = not os.path.exists(path)
    if changed and not check:
        open(path, "a").close()
    return {"changed": changed, "check": check}


class AnswerPlugin:
    @hookimpl
    def chopsticks_register_facts(self, register):
        register(answer, timeout=1.5)
        register(pid, name="remote_pid")


class MarkerPlugin:
    @hookimpl
    def chopsticks_register_tasks(self, register):
        register(make_marker)


class EchoTunnel:
    """A stand-in tunnel object: what the factory was given."""

    def __init__(self, address, **options):
        self.host, self.options = address, options


class EchoTunnelPlugin:
    @hookimpl
    def chopsticks_register_tunnels(self, register):
        register("echo", EchoTunnel)


# -- documentation and tests of every hook (like datasette's test_docs) ------

HOOK_NAMES = sorted(name for name in dir(hookspecs) if name.startswith("chopsticks_"))


def _documented_hooks():
    text = (ROOT / "docs" / "reference" / "hooks.rst").read_text()
    # A section heading: the hook's signature underlined.
    return set(re.findall(r"^(chopsticks_\w+)\(.*\)\n[~\-=^\x22]{3,}$", text, re.MULTILINE))


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hook_is_documented(hook):
    assert hook in _documented_hooks(), (
        f"{hook} has no section in docs/reference/hooks.rst")


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hook_has_reference_docstring(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and ":param register:" in doc and ":return:" in doc


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hook_is_tested(hook):
    assert f"test_hook_{hook}" in globals(), f"no test named test_hook_{hook} in {__file__}"


NO_HOOKIMPL_EXPORT = pytest.mark.xfail(
    not hasattr(chopsticks, "hookimpl"), strict=True,
    reason="chopsticks/__init__.py (core) must re-export hookimpl from chopsticks.hookspecs")


@NO_HOOKIMPL_EXPORT
def test_hookimpl_is_exported():
    assert chopsticks.hookimpl is hookimpl


# -- the three hooks --------------------------------------------------------


def test_hook_chopsticks_register_facts(chopsticks_plugin_manager, chopsticks_local):
    chopsticks_plugin_manager.register(AnswerPlugin())
    from chopsticks import facts
    from chopsticks.facts import answer as imported

    assert facts.answer is answer is imported
    assert chopsticks_local.call(facts.answer) == 42
    assert chopsticks_local.call(facts.remote_pid) != os.getpid()
    registration = chopsticks_plugin_manager.facts["answer"]
    assert registration.metadata == {"timeout": 1.5, "description": "The answer, computed on the host."}
    assert "answer" in dir(facts) and "remote_pid" in dir(facts)


def test_hook_chopsticks_register_tasks(chopsticks_plugin_manager, chopsticks_local, tmp_path):
    chopsticks_plugin_manager.register(MarkerPlugin())
    from chopsticks import tasks

    marker = str(tmp_path / "marker")
    assert chopsticks_local.call(tasks.make_marker, marker, check=True) == {"changed": True, "check": True}
    assert not os.path.exists(marker)
    assert chopsticks_local.call(tasks.make_marker, marker)["changed"] is True
    assert chopsticks_local.call(tasks.make_marker, marker)["changed"] is False


def test_hook_chopsticks_register_tunnels(chopsticks_plugin_manager):
    chopsticks_plugin_manager.register(EchoTunnelPlugin())
    tunnel = tunnel_from_url("echo://box%201?python=/usr/bin/python3&timeout=5&flag=true")
    assert isinstance(tunnel, EchoTunnel)
    assert tunnel.host == "box 1"
    assert tunnel.options == {"python": "/usr/bin/python3", "timeout": 5, "flag": True}
    info = next(i for i in chopsticks_plugin_manager.plugins() if i.tunnels == ["echo"])
    assert info.status == "ok"


# -- the built-in tunnel schemes --------------------------------------------


def test_builtin_schemes_make_core_tunnels(chopsticks_plugin_manager):
    assert isinstance(tunnel_from_url("local"), chopsticks.Local)
    assert tunnel_from_url("local://box2").host == "box2"
    assert tunnel_from_url("local://?python=/usr/bin/python3").python == "/usr/bin/python3"
    sudo = tunnel_from_url("sudo://postgres")
    assert isinstance(sudo, chopsticks.Sudo) and sudo.user == "postgres"
    assert tunnel_from_url("sudo://").user == "root"
    docker = tunnel_from_url("docker://web?image=python:3.12")
    assert isinstance(docker, chopsticks.Docker) and (docker.host, docker.image) == ("web", "python:3.12")
    ssh = tunnel_from_url("deploy@web1:2222")
    assert isinstance(ssh, chopsticks.SSHTunnel)
    assert ssh.host == "deploy@web1"
    assert ssh.ssh_settings.port == 2222


def test_builtin_plugin_is_listed(chopsticks_plugin_manager):
    (info,) = chopsticks_plugin_manager.plugins()
    assert (info.name, info.builtin, info.status) == ("chopsticks", True, "ok")
    assert info.tunnels == ["doas", "docker", "local", "ssh", "su", "sudo"]


def test_local_url_runs_calls(chopsticks_plugin_manager):
    tunnel = tunnel_from_url("local://")
    try:
        assert tunnel.call(answer) == 42
    finally:
        tunnel.close()


def test_unknown_scheme_names_the_known_ones(chopsticks_plugin_manager):
    with pytest.raises(ValueError, match=r"unknown tunnel scheme in host 'podman://x'.*"
                                         r"doas://, docker://, local://, ssh://, su://, sudo://"):
        tunnel_from_url("podman://x")


@pytest.mark.parametrize("url, message", [
    ("docker://", "docker:// needs a container name"),
    ("ssh://", "ssh:// needs a host"),
])
def test_bad_addresses_say_what_is_expected(chopsticks_plugin_manager, url, message):
    with pytest.raises(ValueError, match=message):
        tunnel_from_url(url)


# -- unknown names ------------------------------------------------------------


def test_unknown_fact_is_an_attribute_error_naming_the_distribution(chopsticks_plugin_manager):
    from chopsticks import facts

    with pytest.raises(AttributeError) as info:
        facts.memory
    message = str(info.value)
    assert "No chopsticks fact is named 'memory'" in message
    assert "provided by chopsticks-facts, which is not installed: pip install chopsticks-facts" in message
    assert "Installed plugins: chopsticks (" in message
    assert not hasattr(facts, "memory")


def test_unknown_fact_import_is_an_import_error_with_the_message(chopsticks_plugin_manager):
    chopsticks_plugin_manager.register(AnswerPlugin())
    with pytest.raises(ImportError) as info:
        from chopsticks.facts import answr  # noqa: F401
    assert "Did you mean 'answer'?" in str(info.value)
    assert "Available facts: answer, remote_pid." in str(info.value)


def test_unknown_task_names_chopsticks_pkg(chopsticks_plugin_manager):
    from chopsticks import tasks

    with pytest.raises(UnknownNameError, match="provided by chopsticks-pkg"):
        tasks.install


@pytest.mark.parametrize("name, distribution", [("file", "chopsticks-files"),
                                                ("service", "chopsticks-system")])
def test_unknown_task_names_its_distribution(chopsticks_plugin_manager, name, distribution):
    from chopsticks import tasks

    with pytest.raises(UnknownNameError, match="provided by " + distribution):
        getattr(tasks, name)


def test_dunder_lookups_are_plain_attribute_errors(chopsticks_plugin_manager):
    from chopsticks import facts

    assert getattr(facts, "__wrapped__", None) is None
    assert facts.__name__ == "chopsticks.facts"


# -- isolation and refusals ---------------------------------------------------


class DuplicateAnswer:
    @hookimpl
    def chopsticks_register_facts(self, register):
        register(pid)
        register(answer)


class RaisingPlugin:
    @hookimpl
    def chopsticks_register_facts(self, register):
        raise RuntimeError("boom")


def _nested():
    def inner():
        return 1
    return inner


class UnimportableFact:
    @hookimpl
    def chopsticks_register_facts(self, register):
        register(_nested())


class TaskWithoutCheck:
    @hookimpl
    def chopsticks_register_tasks(self, register):
        register(answer)


class BadScheme:
    @hookimpl
    def chopsticks_register_tunnels(self, register):
        register("Not A Scheme", EchoTunnel)


class DuplicateScheme:
    @hookimpl
    def chopsticks_register_tunnels(self, register):
        register("local", EchoTunnel)


def _status(pm, name):
    return next((i.status, i.message) for i in pm.plugins() if i.name == name)


def test_duplicate_fact_is_used_by_neither_plugin(chopsticks_plugin_manager):
    pm = chopsticks_plugin_manager
    pm.register(AnswerPlugin(), name="first")
    with pytest.warns(PluginWarning, match="registered by both plugin 'first'"):
        pm.register(DuplicateAnswer(), name="second")
        pm.facts
    expected = ("the fact 'answer' is registered by both plugin 'first' (registered in code) "
                "and plugin 'second' (registered in code); neither is used")
    for name in ("first", "second"):
        status, message = _status(pm, name)
        assert status == "error" and message.startswith(expected)
    # Each keeps what only it registered; the disputed name fails, saying why.
    assert set(pm.facts) == {"remote_pid", "pid"}
    from chopsticks import facts

    with pytest.raises(AttributeError, match=re.escape(
            "The fact 'answer' is registered by both plugin 'first'")):
        facts.answer
    # Whatever the order, the outcome is the same.
    pm.unregister(name="first")
    with pytest.warns(PluginWarning, match="is not fully usable"):
        pm.register(AnswerPlugin(), name="first")
        assert set(pm.facts) == {"remote_pid", "pid"}


def test_raising_hook_is_isolated(chopsticks_plugin_manager):
    pm = chopsticks_plugin_manager
    pm.register(AnswerPlugin())
    with pytest.warns(PluginWarning, match="its hook raised RuntimeError: boom"):
        pm.register(RaisingPlugin(), name="raising")
        assert pm.lookup("fact", "answer") is answer
    assert _status(pm, "raising") == ("error", "its hook raised RuntimeError: boom")


@pytest.mark.parametrize("plugin, message", [
    (UnimportableFact(), "could not import it as test_plugins._nested.<locals>.inner"),
    (TaskWithoutCheck(), "takes no 'check' keyword argument"),
    (BadScheme(), "registers the tunnel scheme 'Not A Scheme'"),
    (DuplicateScheme(), f"the tunnel 'local' is registered by both chopsticks {chopsticks.__version__} and "
                        "plugin 'bad' (registered in code); chopsticks' own is used"),
])
def test_bad_registrations_are_refused(chopsticks_plugin_manager, plugin, message):
    with pytest.warns(PluginWarning):
        chopsticks_plugin_manager.register(plugin, name="bad")
        chopsticks_plugin_manager.plugins()
    status, text = _status(chopsticks_plugin_manager, "bad")
    assert status == "error" and message in text


def test_builtin_scheme_survives_a_duplicate(chopsticks_plugin_manager):
    with pytest.warns(PluginWarning):
        chopsticks_plugin_manager.register(DuplicateScheme())
        assert isinstance(tunnel_from_url("local://"), chopsticks.Local)


def test_register_error_is_a_plugin_error():
    assert issubclass(PluginError, chopsticks.ChopsticksError)


def test_unregister_removes_registrations(chopsticks_plugin_manager):
    plugin = AnswerPlugin()
    chopsticks_plugin_manager.register(plugin)
    assert "answer" in chopsticks_plugin_manager.facts
    chopsticks_plugin_manager.unregister(plugin)
    assert "answer" not in chopsticks_plugin_manager.facts
    assert [i.name for i in chopsticks_plugin_manager.plugins()] == ["chopsticks"]


def test_plugin_with_an_unknown_hook_is_refused(chopsticks_plugin_manager):
    class Misspelled:
        @hookimpl
        def chopsticks_register_fact(self, register):
            pass

    with pytest.raises(Exception, match="unknown hook 'chopsticks_register_fact'"):
        chopsticks_plugin_manager.register(Misspelled())
    assert [i.name for i in chopsticks_plugin_manager.plugins()] == ["chopsticks"]


# -- lazy loading and the environment ---------------------------------------


def test_nothing_loads_until_first_use():
    pm = PluginManager()
    assert pm.get_plugins() == set()
    pm.tunnels
    assert pm.get_plugin("chopsticks") is not None


def test_autoload_can_be_turned_off_by_environment():
    pm = PluginManager(environ={"CHOPSTICKS_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert all(i.status == "disabled" for i in pm.plugins() if not i.builtin)
    assert "ip" not in pm.facts


def test_allow_list_naming_nothing_installed_warns():
    with pytest.warns(PluginWarning, match="CHOPSTICKS_PLUGINS names 'no-such-plugin'"):
        PluginManager(environ={"CHOPSTICKS_PLUGINS": "no-such-plugin"}).plugins()


def test_fixture_restores_the_previous_manager(pytester):
    pytester.makepyfile("""
        from chopsticks.plugins import get_plugin_manager

        def test_inside(chopsticks_plugin_manager):
            assert get_plugin_manager() is chopsticks_plugin_manager
            assert chopsticks_plugin_manager._autoload is False

        def test_after():
            assert get_plugin_manager()._autoload is True

        def test_local(chopsticks_local):
            import os
            assert chopsticks_local.call(os.getpid) != os.getpid()
    """)
    # Load the fixtures by module name whether or not chopsticks' pytest11 entry point is installed.
    result = pytester.runpytest_subprocess("-p", "no:chopsticks", "-p", "chopsticks.testing.fixtures")
    result.assert_outcomes(passed=3)


def test_testing_plugin_imports_nothing_heavy():
    code = ("import sys; import chopsticks.testing.fixtures; "
            "heavy = [m for m in ('chopsticks.plugins', 'fabric', 'paramiko', 'click', 'rich') "
            "if m in sys.modules]; print(heavy)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_manager_is_shared():
    assert get_plugin_manager() is get_plugin_manager()

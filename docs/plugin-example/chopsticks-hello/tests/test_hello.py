import chopsticks_hello.plugin
from chopsticks_hello import touch, whoami


def test_touch(chopsticks_plugin_manager, chopsticks_local, tmp_path):
    chopsticks_plugin_manager.register(chopsticks_hello.plugin)
    from chopsticks.tasks import touch as registered
    assert registered is touch
    path = str(tmp_path / "x")
    assert chopsticks_local.call(touch, path, check=True)["changed"]
    assert chopsticks_local.call(touch, path)["changed"]
    assert not chopsticks_local.call(touch, path)["changed"]


def test_whoami(chopsticks_plugin_manager, chopsticks_local):
    chopsticks_plugin_manager.register(chopsticks_hello.plugin)
    from chopsticks.facts import whoami as registered
    assert registered is whoami
    import getpass
    assert chopsticks_local.call(registered) == getpass.getuser()

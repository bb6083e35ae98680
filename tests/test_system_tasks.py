"""chopsticks-system: the service, user and group tasks.

What runs for real on this machine (Debian, root, no systemd as PID 1):

* users and groups: real ``useradd``/``usermod``/``userdel``,
  ``groupadd``/``groupmod``/``groupdel`` and ``chpasswd``, on accounts with
  unique names that the fixtures delete;
* sysvinit: a tiny daemon's init script installed in /etc/init.d, driven
  through Debian's ``service``, ``start-stop-daemon`` and ``update-rc.d``;
* runit: ``runsvdir`` started by the test on a temporary service directory,
  driven through ``sv`` (``.ci/run`` installs the ``runit`` package).

What is RECORDED (``plugins/chopsticks-system/tests/fixtures``): the outputs
of systemd's ``systemctl show``, OpenRC's ``rc-service status`` and
``rc-update show -v``, and launchd's ``launchctl list`` and
``print-disabled``.  They are parsed directly, and served by stand-in
executables that answer those queries only (anything else exits 99), so the
``service`` task's decisions and check mode run end to end on them.
"""
import ast
import grp
import os
import plistlib
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # CI installs the plugins (.ci/run); elsewhere they may be missing
    pytest.importorskip("chopsticks_system", reason="pip install -e plugins/chopsticks-system")

import chopsticks_system
from chopsticks import Local, RemoteException, Tunnel, tasks
from chopsticks_system import TaskError, accounts, plan_service, services
from chopsticks_system.services import Launchd, OpenRC, Runit, SysVinit

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "plugins" / "chopsticks-system" / "tests" / "fixtures"
SRC = Path(chopsticks_system.__file__).resolve().parent
# A crypt(3) SHA-512 hash (of "chopsticks"); the tests check it never leaks into messages.
HASH_1 = "$6$Ks7q1bSR$9mJ6ibX2.mrzE3MSW3V1rqnD9hFOYlgHo5Gqu3k/JxkRzX4QyWh/4VhkNtp3zFqkfGJ.7Cq4qv/1IP7kDmyVk0"
HASH_2 = "$6$abcdefgh$Zq0mV3q9sQvl2t1i7C2sQ2d3Xy0p3y9PZ0QpA4nUGg5oG0W7hY4cZ2D1d9Mq9yT3nL9bW8xR5vK1uJ6sH2aF1/"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def fixture(name):
    return (FIXTURES / name).read_text()


def remote_error(tunnel, task, *args, **kwargs):
    with pytest.raises(RemoteException) as info:
        tunnel.call(task, *args, **kwargs)
    assert info.value.type_name.endswith("TaskError")
    assert f"[{tunnel.host}]" in str(info.value)  # the host is named
    return info.value.msg


# -- the package itself --------------------------------------------------------------


def test_tasks_are_registered_without_clashes():
    for name in ("service", "user", "group"):
        assert getattr(tasks, name) is getattr(chopsticks_system, name)
    # chopsticks-files registers file, directory, line, link; chopsticks-pkg its four
    assert not set(chopsticks_system.TASKS) & {"file", "directory", "line", "link", "install",
                                              "remove", "latest", "update_cache"}


def test_list_plugins_lists_the_distribution():
    out = subprocess.run([sys.executable, "-m", "chopsticks.cli", "list-plugins"],
                         capture_output=True, text=True)
    if out.returncode:  # no __main__ in chopsticks.cli: use the console script
        out = subprocess.run([str(Path(sys.executable).with_name("chopsticks")), "list-plugins"],
                             capture_output=True, text=True, check=True)
    assert re.search(r"chopsticks-system 2\.0\.0\s+ok\s+tasks: group, service, user", out.stdout)


def test_task_modules_are_python36_syntax():
    for path in sorted(SRC.glob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 6))


def test_host_side_imports_only_the_standard_library():
    facts_src = Path(sys.modules["chopsticks_facts"].__file__).resolve().parent.parent
    code = ("import sys; before = set(sys.modules); import chopsticks_system, chopsticks_facts; "
            "print(sorted(m.split('.')[0] for m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=f"{SRC.parent}{os.pathsep}{facts_src}"))
    imported = set(ast.literal_eval(out.stdout)) - {"chopsticks_system", "chopsticks_facts"}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_bad_arguments_name_task_argument_and_value():
    with pytest.raises(TaskError, match=r"^service: state='running': must be one of 'started'"):
        chopsticks_system.service("x", state="running", manager="sysvinit")
    with pytest.raises(TaskError, match=r"^service: manager='upstart': unknown service manager: "
                                        r"chopsticks-system knows launchd, openrc, runit"):
        chopsticks_system.service("x", manager="upstart")
    with pytest.raises(TaskError, match=r"^group: gid=-1: must be a non-negative integer"):
        chopsticks_system.group("x", gid=-1)
    with pytest.raises(TaskError, match=r"^user: name='a:b': not a valid name"):
        chopsticks_system.user("a:b")
    with pytest.raises(TaskError, match=r"^user: state='gone': must be one of 'present', 'absent'"):
        chopsticks_system.user("x", state="gone")


def test_manager_from_the_service_manager_fact():
    from chopsticks_facts import service_manager
    detected = service_manager()
    if detected is None:
        assert services.get_manager(None).name == "sysvinit"  # /etc/init.d and service exist here
    else:
        assert services.get_manager(None).name == detected


def test_plan_service():
    stopped = {"running": False, "enabled": False}
    running = {"running": True, "enabled": True}
    assert plan_service(stopped, "started", True) == ["enable", "start"]
    assert plan_service(running, "started", True) == []
    assert plan_service(running, "stopped", False) == ["disable", "stop"]
    assert plan_service(stopped, "stopped", None) == []
    assert plan_service(running, "restarted") == ["restart"]
    assert plan_service(stopped, "restarted") == ["restart"]
    assert plan_service(running, "reloaded") == ["reload"]
    assert plan_service(stopped, "reloaded") == ["start"]


def test_user_command_lines():
    assert accounts.useradd_argv("web", 900, "www", ["adm", "log"], "/bin/sh", "/srv/web",
                                 create_home=False, system=True) == [
        "useradd", "-u", "900", "-g", "www", "-G", "adm,log", "-s", "/bin/sh", "-d", "/srv/web",
        "-M", "-r", "web"]
    # BusyBox (Alpine): supplementary groups are added with addgroup afterwards
    assert accounts.useradd_argv("web", 900, "www", ["adm"], "/bin/sh", "/srv/web",
                                 create_home=False, system=True, toolset="busybox") == [
        "adduser", "-D", "-u", "900", "-G", "www", "-s", "/bin/sh", "-h", "/srv/web", "-H", "-S", "web"]
    assert accounts.usermod_argv("web", {"shell": "/bin/bash", "groups": (["adm"], True)}) == [
        "usermod", "-s", "/bin/bash", "-a", "-G", "adm", "web"]
    assert accounts.groupadd_argv("www", 900, True, "busybox") == ["addgroup", "-g", "900", "-S", "www"]
    assert accounts.groupadd_argv("www", None, False) == ["groupadd", "www"]


# -- recorded outputs: systemd, OpenRC, launchd ----------------------------------------


def test_parse_systemctl_show():  # RECORDED
    assert services.parse_systemctl_show(fixture("systemctl-show-nginx.txt")) == {
        "exists": True, "running": True, "enabled": True, "unit_file_state": "enabled"}
    assert services.parse_systemctl_show(fixture("systemctl-show-cron.txt"))["running"] is False
    assert services.parse_systemctl_show(fixture("systemctl-show-failed.txt"))["running"] is False
    assert services.parse_systemctl_show(fixture("systemctl-show-static.txt"))["enabled"] is True
    assert services.parse_systemctl_show(fixture("systemctl-show-masked.txt"))["enabled"] is False
    assert services.parse_systemctl_show(fixture("systemctl-show-not-found.txt"))["exists"] is False


def test_parse_openrc():  # RECORDED
    assert services.parse_openrc_status(fixture("rc-service-status-started.txt"), 0) == {
        "running": True, "status": "started"}
    assert services.parse_openrc_status(fixture("rc-service-status-stopped.txt"), 3)["running"] is False
    assert services.parse_openrc_status(fixture("rc-service-status-crashed.txt"), 32) == {
        "running": False, "status": "crashed"}
    runlevels = services.parse_rc_update_show(fixture("rc-update-show-v.txt"))
    assert runlevels["sshd"] == ["default"] and runlevels["devfs"] == ["sysinit"]
    assert runlevels["nginx"] == [] and runlevels["acpid"] == []


def test_parse_launchctl():  # RECORDED
    jobs = services.parse_launchctl_list(fixture("launchctl-list.txt"))
    assert jobs["com.example.web"] == {"pid": 4242, "status": 0}
    assert jobs["com.example.worker"] == {"pid": None, "status": 78}
    assert "Label" not in jobs and len(jobs) == 5
    expected = {"com.apple.ftp-proxy": True, "com.openssh.sshd": False, "com.example.worker": True}
    assert services.parse_launchctl_print_disabled(fixture("launchctl-print-disabled-13.txt")) == expected
    assert services.parse_launchctl_print_disabled(fixture("launchctl-print-disabled-12.txt")) == expected


def test_parse_sv_status():  # what this machine's sv printed (see the runit tests below)
    assert services.parse_sv_status("run: /tmp/s/web: (pid 1234) 56s; run: log: (pid 1230) 56s\n") == "run"
    assert services.parse_sv_status("down: /tmp/s/web: 3s, normally up\n") == "down"
    assert services.parse_sv_status(
        "warning: /tmp/s/web: unable to open supervise/ok: file does not exist\n") is None


# executable -> [(its exact arguments, recorded output, exit status)]
SHOW = "show --property=LoadState,ActiveState,UnitFileState"
RECORDED = {
    "systemctl": [(f"{SHOW} nginx", "systemctl-show-nginx.txt", 0),
                  (f"{SHOW} cron", "systemctl-show-cron.txt", 0),
                  (f"{SHOW} failed-app", "systemctl-show-failed.txt", 0),
                  (f"{SHOW} tmpfiles-clean", "systemctl-show-static.txt", 0),
                  (f"{SHOW} masked-app", "systemctl-show-masked.txt", 0),
                  (f"{SHOW} no-such-unit", "systemctl-show-not-found.txt", 0)],
    "rc-service": [("sshd status", "rc-service-status-started.txt", 0),
                   ("nginx status", "rc-service-status-stopped.txt", 3),
                   ("crond status", "rc-service-status-crashed.txt", 32)],
    "rc-update": [("show -v", "rc-update-show-v.txt", 0)],
    "launchctl": [("list", "launchctl-list.txt", 0),
                  ("print-disabled system", "launchctl-print-disabled-13.txt", 0)],
}


@pytest.fixture
def recorded_managers(tmp_path, monkeypatch):
    """Stand-ins that print the recorded outputs; any other command exits 99 (and is logged)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "commands.log"
    for executable, queries in RECORDED.items():
        cases = "".join(f'  "{args}") cat "{FIXTURES / name}"; exit {status} ;;\n'
                        for args, name, status in queries)
        script = bin_dir / executable
        script.write_text(f'#!/bin/sh\necho "$0 $*" >> "{log}"\ncase "$*" in\n{cases}'
                          f'  *) echo "not a query: $*" >&2; exit 99 ;;\nesac\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def plan(name, manager, **kwargs):
    result = chopsticks_system.service(name, check=True, manager=manager, **kwargs)
    assert result["check"] is True
    return result["changed"], result["actions"], result["after"]


@pytest.mark.parametrize("name, wanted, expected", [
    ("nginx", dict(state="started", enabled=True), (False, [], {"running": True, "enabled": True})),
    ("cron", dict(state="started", enabled=True),
     (True, ["enable", "start"], {"running": True, "enabled": True})),
    ("cron", dict(state="stopped", enabled=False), (False, [], {"running": False, "enabled": False})),
    ("nginx", dict(state="restarted"), (True, ["restart"], {"running": True, "enabled": True})),
    ("nginx", dict(state="reloaded"), (True, ["reload"], {"running": True, "enabled": True})),
    ("cron", dict(state="reloaded"), (True, ["start"], {"running": True, "enabled": False})),
    ("failed-app", dict(state="started"), (True, ["start"], {"running": True, "enabled": True})),
    ("tmpfiles-clean", dict(enabled=True), (False, [], {"running": False, "enabled": True})),
])
def test_systemd_check_mode(recorded_managers, name, wanted, expected):  # RECORDED
    assert plan(name, "systemd", **wanted) == expected


def test_check_mode_runs_queries_only(recorded_managers, openrc):  # RECORDED
    plan("cron", "systemd", state="started", enabled=True)
    plan("nginx", openrc, state="started", enabled=True)
    commands = [line.split(None, 1) for line in recorded_managers.read_text().splitlines()]
    assert [(os.path.basename(exe), args) for exe, args in commands] == [
        ("systemctl", f"{SHOW} cron"),
        ("rc-service", "nginx status"), ("rc-update", "show -v")]


@pytest.mark.parametrize("name, enabled, problem", [
    ("tmpfiles-clean", False, "systemd unit tmpfiles-clean is static: systemctl enable/disable cannot"),
    ("masked-app", True, "systemd unit masked-app is masked: .* \\(unmask it first\\)"),
])
def test_systemd_refuses_what_enable_cannot_change(recorded_managers, name, enabled, problem):
    with pytest.raises(TaskError, match=f"^service: enabled={enabled}: {problem}"):
        plan(name, "systemd", enabled=enabled)


def test_systemd_unknown_unit(recorded_managers):  # RECORDED
    with pytest.raises(TaskError, match=r"^service: name='no-such-unit': systemd knows no such service"):
        chopsticks_system.service("no-such-unit", state="started", manager="systemd")
    # check mode plans past it: a deployment's earlier install task would bring it
    result = chopsticks_system.service("no-such-unit", state="started", manager="systemd", check=True)
    assert result["actions"] == ["start"] and result["before"] == {"running": False, "enabled": False}
    assert result["warnings"] == ["service: name='no-such-unit': systemd knows no such service "
                                  "(looked in systemctl show: LoadState=not-found) "
                                  "(yet: an earlier task must install it)"]


@pytest.fixture
def openrc(tmp_path):
    init_dir = tmp_path / "init.d"
    init_dir.mkdir()
    for name in ("sshd", "nginx", "crond"):
        (init_dir / name).write_text("#!/sbin/openrc-run\n")
    return OpenRC(init_dir=str(init_dir))


@pytest.mark.parametrize("name, wanted, expected", [
    ("sshd", dict(state="started", enabled=True), (False, [], {"running": True, "enabled": True})),
    ("nginx", dict(state="started", enabled=True),
     (True, ["enable", "start"], {"running": True, "enabled": True})),
    ("crond", dict(state="started"), (True, ["start"], {"running": True, "enabled": True})),
    ("sshd", dict(state="stopped", enabled=False),
     (True, ["disable", "stop"], {"running": False, "enabled": False})),
])
def test_openrc_check_mode(recorded_managers, openrc, name, wanted, expected):  # RECORDED
    assert plan(name, openrc, **wanted) == expected


def test_openrc_unknown_service(recorded_managers, openrc):
    with pytest.raises(TaskError, match=r"^service: name='apache2': openrc knows no such service"):
        chopsticks_system.service("apache2", state="started", manager=openrc)


@pytest.fixture
def launchd(tmp_path):
    plist_dir = tmp_path / "LaunchDaemons"
    plist_dir.mkdir()
    for label in ("com.example.web", "com.example.worker"):
        with open(plist_dir / f"{label}.plist", "wb") as f:
            plistlib.dump({"Label": label, "ProgramArguments": ["/usr/local/bin/" + label]}, f)
    return Launchd(plist_dirs=(str(plist_dir),))


@pytest.mark.parametrize("name, wanted, expected", [
    ("com.example.web", dict(state="started", enabled=True),
     (False, [], {"running": True, "enabled": True})),
    ("com.example.worker", dict(state="started", enabled=True),
     (True, ["enable", "start"], {"running": True, "enabled": True})),
    ("com.example.web", dict(state="stopped"), (True, ["stop"], {"running": False, "enabled": True})),
    ("com.openssh.sshd", dict(state="stopped"), (False, [], {"running": False, "enabled": True})),
])
def test_launchd_check_mode(recorded_managers, launchd, name, wanted, expected):  # RECORDED
    assert plan(name, launchd, **wanted) == expected


def test_launchd_has_no_reload(recorded_managers, launchd):  # RECORDED
    with pytest.raises(TaskError, match=r"^service: state='reloaded': launchd has no reload"):
        plan("com.example.web", launchd, state="reloaded")
    with pytest.raises(TaskError, match=r"^service: name='com.example.nope': launchd knows no such"):
        chopsticks_system.service("com.example.nope", state="started", manager=launchd)


# -- sysvinit, for real ----------------------------------------------------------------

INIT_SCRIPT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          {name}
# Required-Start:
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: chopsticks-system test daemon
### END INIT INFO
# A shell loop that logs SIGHUP: start, stop, restart, reload and LSB status.
PIDFILE={pidfile}
LOG={log}
case "$1" in
  start)
    if [ -e {fail} ]; then echo "{name}: cannot bind port 8080: address in use" >&2; exit 1; fi
    start-stop-daemon --start --quiet --oknodo --background --make-pidfile --pidfile $PIDFILE \\
        --startas /bin/sh -- -c 'trap "echo reload >> {log}" HUP; echo start >> {log}; while :; do sleep 1 & wait $!; done'
    ;;
  stop) start-stop-daemon --stop --quiet --oknodo --retry 5 --pidfile $PIDFILE --remove-pidfile ;;
  restart) "$0" stop && "$0" start ;;
  reload) start-stop-daemon --stop --quiet --signal HUP --pidfile $PIDFILE ;;
  status) start-stop-daemon --status --pidfile $PIDFILE ;;
  *) echo "Usage: $0 {{start|stop|restart|reload|status}}" >&2; exit 2 ;;
esac
"""


def pid_of(pidfile):
    try:
        pid = int(Path(pidfile).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def rc_links(name):
    return sorted(p.name[0] + p.parent.name[2] for p in Path("/etc").glob(f"rc?.d/[SK]??{name}"))


def wait_for(predicate, what, limit=15.0):
    """Poll for something a signal handler does asynchronously (not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit}s"
        time.sleep(0.05)


@pytest.fixture
def sysv_service(tmp_path):
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("service", "start-stop-daemon", "update-rc.d")):
        pytest.skip("needs root, service, start-stop-daemon and update-rc.d (Debian; CI has them)")
    name = f"cs-sysv-{secrets.token_hex(3)}"
    paths = {"pidfile": tmp_path / "daemon.pid", "log": tmp_path / "daemon.log",
             "fail": tmp_path / "fail"}
    script = Path("/etc/init.d") / name
    script.write_text(INIT_SCRIPT.format(name=name, **paths))
    script.chmod(0o755)
    yield name, paths
    pid = pid_of(paths["pidfile"])
    if pid:
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["update-rc.d", "-f", name, "remove"], capture_output=True)
    script.unlink()


@needs_root
def test_sysvinit_service_for_real(sysv_service):
    name, paths = sysv_service
    with Local() as host:
        def call(**kwargs):
            return host.call(tasks.service, name, manager="sysvinit", **kwargs)

        planned = call(state="started", enabled=True, check=True)
        assert planned == {"changed": True, "check": True, "manager": "sysvinit", "name": name,
                           "actions": ["enable", "start"],
                           "before": {"running": False, "enabled": False},
                           "after": {"running": True, "enabled": True}}
        assert pid_of(paths["pidfile"]) is None and rc_links(name) == []

        done = call(state="started", enabled=True)
        assert done["changed"] is True and done["actions"] == ["enable", "start"]
        assert done["after"] == {"running": True, "enabled": True}
        first_pid = pid_of(paths["pidfile"])
        assert first_pid and "S2" in rc_links(name) and "K0" in rc_links(name)

        again = call(state="started", enabled=True)
        assert again["changed"] is False and again["actions"] == []

        restarted = call(state="restarted")
        assert restarted["changed"] is True and restarted["actions"] == ["restart"]
        assert pid_of(paths["pidfile"]) not in (None, first_pid)
        # the daemon logs "start" once its SIGHUP handler is in place
        wait_for(lambda: paths["log"].read_text().count("start") == 2, "the second start")

        assert call(state="reloaded", check=True)["actions"] == ["reload"]
        assert "reload" not in paths["log"].read_text()
        reloaded = call(state="reloaded")
        assert reloaded["changed"] is True and reloaded["actions"] == ["reload"]
        wait_for(lambda: paths["log"].exists() and "reload" in paths["log"].read_text(), "the reload")

        assert call(state="stopped", enabled=False, check=True)["changed"] is True
        assert pid_of(paths["pidfile"]) and "S2" in rc_links(name)
        stopped = call(state="stopped", enabled=False)
        assert stopped["changed"] is True and stopped["actions"] == ["disable", "stop"]
        assert stopped["after"] == {"running": False, "enabled": False}
        assert pid_of(paths["pidfile"]) is None and "K2" in rc_links(name)
        assert call(state="stopped", enabled=False)["changed"] is False


@needs_root
def test_sysvinit_errors_name_host_task_argument(sysv_service):
    name, paths = sysv_service
    with Local() as host:
        msg = remote_error(host, tasks.service, "cs-no-such-service", state="started",
                           manager="sysvinit")
        assert msg.startswith("service: name='cs-no-such-service': sysvinit knows no such service")

        paths["fail"].touch()
        msg = remote_error(host, tasks.service, name, state="started", manager="sysvinit")
        assert msg.startswith(f"service: name='{name}': `service {name} start` failed with exit status 1")
        assert "cannot bind port 8080: address in use" in msg  # the tail of its stderr
        assert pid_of(paths["pidfile"]) is None


# -- runit, for real -------------------------------------------------------------------

RUN_SCRIPT = """#!/bin/sh
trap 'echo reload >> {log}' HUP
echo start >> {log}
while :; do sleep 1 & wait $!; done
"""


@pytest.fixture
def runit(tmp_path):
    """runsvdir on a temporary service directory, and a definition directory with one service."""
    if not shutil.which("runsvdir"):
        if os.environ.get("CI"):
            pytest.fail("runsvdir not found: .ci/run installs the runit package")
        pytest.skip("runsvdir not found: apt-get install runit")
    service_dir, definitions = tmp_path / "service", tmp_path / "sv"
    name = f"cs-runit-{secrets.token_hex(3)}"
    log = tmp_path / "service.log"
    (definitions / name).mkdir(parents=True)
    service_dir.mkdir()
    run = definitions / name / "run"
    run.write_text(RUN_SCRIPT.format(log=log))
    run.chmod(0o755)
    runsvdir = subprocess.Popen(["runsvdir", str(service_dir)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    manager = Runit(definition_dirs=(str(definitions),), service_dir=str(service_dir))
    yield name, manager, log
    runsvdir.terminate()
    runsvdir.wait()
    # runsv outlives runsvdir: stop the service and make runsv exit
    subprocess.run(["sv", "-w", "10", "force-shutdown", str(definitions / name)], capture_output=True)


@needs_root
def test_runit_service_for_real(runit):
    name, manager, log = runit
    linked = Path(manager.service_dir) / name
    with Local() as host:
        def call(**kwargs):
            return host.call(tasks.service, name, manager=manager, **kwargs)

        planned = call(state="started", enabled=True, check=True)
        assert planned["changed"] is True and planned["actions"] == ["enable", "start"]
        assert planned["after"] == {"running": True, "enabled": True}
        assert not os.path.lexists(linked)

        done = call(state="started", enabled=True)
        assert done["changed"] is True and done["actions"][0] == "enable"
        assert done["after"] == {"running": True, "enabled": True} and linked.is_symlink()
        status = subprocess.run(["sv", "status", str(linked)], capture_output=True, text=True).stdout
        assert status.startswith(f"run: {linked}:"), status

        again = call(state="started", enabled=True)
        assert again["changed"] is False and again["actions"] == []

        restarted = call(state="restarted")
        assert restarted["changed"] is True and restarted["actions"] == ["restart"]
        # the run script logs "start" once its SIGHUP handler is in place
        wait_for(lambda: log.read_text().count("start") == 2, "the second start")

        reloaded = call(state="reloaded")
        assert reloaded["changed"] is True and reloaded["actions"] == ["reload"]
        wait_for(lambda: "reload" in log.read_text(), "the reload (sv hup)")

        assert call(state="stopped", check=True)["after"] == {"running": False, "enabled": True}
        stopped = call(state="stopped")
        assert stopped["changed"] is True and stopped["after"] == {"running": False, "enabled": True}
        assert call(state="stopped")["changed"] is False

        disabled = call(enabled=False)
        assert disabled["changed"] is True and disabled["after"] == {"running": False, "enabled": False}
        assert not os.path.lexists(linked)
        assert call(enabled=False)["changed"] is False

        msg = remote_error(host, tasks.service, name, state="started", manager=manager)
        assert msg.startswith(f"service: state='started': runit runs only the services linked into")
        assert "pass enabled=True" in msg
        msg = remote_error(host, tasks.service, "cs-no-such", state="started", manager=manager)
        assert msg.startswith("service: name='cs-no-such': runit knows no such service")


# -- groups and users, for real ----------------------------------------------------------


def free_id(taken):
    return next(i for i in range(42000, 60000) if i not in taken)


def free_gid():
    return free_id({g.gr_gid for g in grp.getgrall()})


def free_uid():
    return free_id({u.pw_uid for u in pwd.getpwall()})


def gid_of(name):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


@pytest.fixture
def account_names():
    """Unique user and group names, deleted afterwards whatever the test left."""
    made = []

    def new(prefix):
        name = f"cs{prefix}{secrets.token_hex(3)}"
        made.append(name)
        return name

    yield new
    for name in made:
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
    for name in made:
        subprocess.run(["groupdel", name], capture_output=True)


@needs_root
def test_group_for_real(account_names):
    name = account_names("g")
    gid, other_gid = free_gid(), None
    with Local() as host:
        planned = host.call(tasks.group, name, gid=gid, check=True)
        assert planned == {"changed": True, "check": True, "name": name, "state": "present",
                           "changes": ["created"], "before": None, "after": {"gid": gid}}
        assert gid_of(name) is None

        created = host.call(tasks.group, name, gid=gid)
        assert created["changed"] is True and created["after"] == {"gid": gid}
        assert gid_of(name) == gid
        assert host.call(tasks.group, name, gid=gid)["changed"] is False
        assert host.call(tasks.group, name)["changed"] is False

        other_gid = free_id({g.gr_gid for g in grp.getgrall()} | {gid})
        planned = host.call(tasks.group, name, gid=other_gid, check=True)
        assert planned["changes"] == ["gid"] and gid_of(name) == gid
        moved = host.call(tasks.group, name, gid=other_gid)
        assert moved["changes"] == ["gid"] and moved["before"] == {"gid": gid}
        assert gid_of(name) == other_gid

        msg = remote_error(host, tasks.group, name, gid=0)  # root's gid is taken
        assert msg.startswith("group: gid=0: `groupmod -g 0 %s` failed with exit status" % name)
        assert "GID '0' already exists" in msg
        assert gid_of(name) == other_gid

        assert host.call(tasks.group, name, state="absent", check=True)["changes"] == ["removed"]
        assert gid_of(name) == other_gid
        removed = host.call(tasks.group, name, state="absent")
        assert removed["changed"] is True and removed["after"] is None and gid_of(name) is None
        assert host.call(tasks.group, name, state="absent")["changed"] is False


def shadow_hash(name):
    return accounts.password_hash(name)


@needs_root
def test_user_for_real(account_names, tmp_path):
    name, primary, extra1, extra2 = (account_names(p) for p in ("u", "p", "a", "b"))
    for group_name in (primary, extra1, extra2):
        subprocess.run(["groupadd", group_name], check=True)
    uid, home = free_uid(), tmp_path / "home"
    wanted = dict(uid=uid, group=primary, groups=[extra1], shell="/bin/sh", home=str(home),
                  password_hash=HASH_1)
    with Local() as host:
        planned = host.call(tasks.user, name, check=True, **wanted)
        assert planned["changed"] is True and planned["changes"] == ["created"]
        assert planned["after"] == {"uid": uid, "group": primary, "groups": [extra1],
                                    "shell": "/bin/sh", "home": str(home)}
        with pytest.raises(KeyError):
            pwd.getpwnam(name)

        created = host.call(tasks.user, name, **wanted)
        assert created["changed"] is True and created["changes"] == ["created"]
        assert created["after"] == planned["after"]
        entry = pwd.getpwnam(name)
        assert (entry.pw_uid, entry.pw_gid, entry.pw_shell) == (uid, gid_of(primary), "/bin/sh")
        assert home.is_dir() and shadow_hash(name) == HASH_1
        assert name in grp.getgrnam(extra1).gr_mem

        again = host.call(tasks.user, name, **wanted)
        assert again["changed"] is False and again["changes"] == []

        planned = host.call(tasks.user, name, shell="/bin/bash", password_hash=HASH_2, check=True)
        assert planned["changes"] == ["shell", "password"]
        assert pwd.getpwnam(name).pw_shell == "/bin/sh" and shadow_hash(name) == HASH_1
        changed = host.call(tasks.user, name, shell="/bin/bash", password_hash=HASH_2)
        assert changed["changes"] == ["shell", "password"]
        assert pwd.getpwnam(name).pw_shell == "/bin/bash" and shadow_hash(name) == HASH_2
        assert HASH_2 not in repr(changed) and HASH_1 not in repr(changed)

        appended = host.call(tasks.user, name, groups=extra2)  # append=True: keeps extra1
        assert appended["changes"] == ["groups"] and appended["after"]["groups"] == sorted([extra1, extra2])
        exact = host.call(tasks.user, name, groups=[extra2], append=False)
        assert exact["changes"] == ["groups"] and exact["after"]["groups"] == [extra2]
        assert name not in grp.getgrnam(extra1).gr_mem
        assert host.call(tasks.user, name, groups=[extra2], append=False)["changed"] is False

        assert host.call(tasks.user, name, state="absent", check=True)["changes"] == ["removed"]
        pwd.getpwnam(name)
        removed = host.call(tasks.user, name, state="absent")
        assert removed["changed"] is True and removed["after"] is None
        with pytest.raises(KeyError):
            pwd.getpwnam(name)
        assert host.call(tasks.user, name, state="absent")["changed"] is False


@needs_root
def test_user_errors_name_host_task_argument_and_hide_the_hash(account_names):
    name = account_names("u")
    with Local() as host:
        msg = remote_error(host, tasks.user, name, group="cs-no-such-group", password_hash=HASH_1)
        assert msg == "user: group='cs-no-such-group': no such group on this host"
        msg = remote_error(host, tasks.user, name, groups=["root", "cs-nope1", "cs-nope2"])
        assert msg.startswith("user: groups=['root', 'cs-nope1', 'cs-nope2']: no such groups "
                              "on this host: cs-nope1, cs-nope2")
        with pytest.raises(KeyError):
            pwd.getpwnam(name)
        # check mode plans past a group an earlier task of a deployment would create
        planned = host.call(tasks.user, name, group="cs-nope1", groups="cs-nope2", check=True)
        assert planned["changes"] == ["created"] and planned["after"]["group"] == "cs-nope1"
        assert planned["warnings"] == [
            "group='cs-nope1': no such group on this host (yet: an earlier task must create it)",
            "groups='cs-nope2': no such group on this host: cs-nope2 (yet: an earlier task must create it)"]

        # a failing command: uid 0 is root's
        msg = remote_error(host, tasks.user, name, uid=0, password_hash=HASH_1)
        assert msg.startswith(f"user: name='{name}': `useradd -u 0 -m {name}` failed with exit status")
        assert "UID 0 is not unique" in msg and HASH_1 not in msg

        msg = remote_error(host, tasks.user, name, password_hash="x:y")
        assert msg.startswith("user: password_hash='<hidden>': must be a crypt(3) hash")
        assert "x:y" not in msg


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")
def test_group_through_ssh(ssh_alias, account_names):
    name = account_names("s")
    with Tunnel(ssh_alias) as host:
        created = host.call(tasks.group, name, system=True)
        assert created["changed"] is True and created["after"]["gid"] == gid_of(name) < 1000
        assert host.call(tasks.group, name, system=True)["changed"] is False
        msg = remote_error(host, tasks.user, name, group="cs-no-such-group")
        assert msg == "user: group='cs-no-such-group': no such group on this host"
        assert host.call(tasks.group, name, state="absent")["changes"] == ["removed"]


@needs_root
def test_tasks_run_on_the_oldest_python(account_names, sysv_service):
    """The host side on Python 3.6 (pyenv's), through the import hook."""
    from conftest import available_pythons
    pythons = available_pythons()
    if not pythons or not pythons[0].endswith("3.6"):
        pytest.skip("no pyenv Python 3.6")
    name = account_names("o")
    service_name, paths = sysv_service
    with Local(python=pythons[0]) as host:
        assert host.call(tasks.group, name)["changes"] == ["created"]
        assert host.call(tasks.user, name, group=name, create_home=False)["changes"] == ["created"]
        assert host.call(tasks.user, name, group=name, create_home=False)["changed"] is False
        started = host.call(tasks.service, service_name, state="started", manager="sysvinit")
        assert started["actions"] == ["start"] and pid_of(paths["pidfile"])
        assert host.call(tasks.user, name, state="absent")["changes"] == ["removed"]

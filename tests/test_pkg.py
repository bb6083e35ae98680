"""chopsticks-pkg: the package tasks.

apt is tested for real (this machine is Debian): a small real package
(``hello``) is installed, pinned, upgraded-to-latest and removed, through a
real tunnel, after a real ``apt-get update``.  The other managers cannot run
here: their query commands' outputs, recorded in their documented formats
(``plugins/chopsticks-pkg/tests/fixtures``), are parsed directly and served
by stand-in executables on ``PATH`` so that each task's check mode (the
plan) runs end to end, command lines included.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # CI installs the plugins (.ci/run); elsewhere they may be missing
    pytest.importorskip("chopsticks_pkg", reason="pip install -e plugins/chopsticks-pkg")

import chopsticks_pkg
from chopsticks import Local, RemoteException, tasks
from chopsticks_pkg import PackageError, backends, install, latest, remove

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "plugins" / "chopsticks-pkg" / "tests" / "fixtures"
SRC = Path(chopsticks_pkg.__file__).resolve().parent
PACKAGE = "hello"  # GNU hello: tiny, no dependencies beyond libc
LIBRARY = "libfyaml0"  # Multi-Arch: same (dpkg names it libfyaml0:amd64); tiny, depends on libc only


def fixture(name):
    return (FIXTURES / name).read_text()


# -- the package itself --------------------------------------------------------------


def test_tasks_are_registered():
    for name in ("install", "remove", "latest", "update_cache"):
        assert getattr(tasks, name) is getattr(chopsticks_pkg, name)


def test_task_modules_are_python36_syntax():
    for path in sorted(SRC.glob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 6))


def test_host_side_imports_only_the_standard_library():
    facts_src = Path(sys.modules["chopsticks_facts"].__file__).resolve().parent.parent
    code = ("import sys; before = set(sys.modules); import chopsticks_pkg; "
            "print(sorted(m.split('.')[0] for m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=f"{SRC.parent}{os.pathsep}{facts_src}"))
    imported = set(ast.literal_eval(out.stdout)) - {"chopsticks_pkg", "chopsticks_facts"}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_unknown_manager_is_refused():
    with pytest.raises(PackageError, match="unknown package manager 'portage': chopsticks-pkg knows apk, apt"):
        install("hello", manager="portage")


def test_package_specs():
    assert chopsticks_pkg._specs(["a", ["b=1.0", "c"], "d e,f"]) == [
        ("a", None), ("b", "1.0"), ("c", None), ("d", None), ("e", None), ("f", None)]
    with pytest.raises(PackageError, match="no package named"):
        chopsticks_pkg._specs([])
    with pytest.raises(PackageError, match="remove takes package names without versions, not b=1"):
        chopsticks_pkg._names(["a", "b=1"], "remove")


# -- parsers, on recorded outputs -------------------------------------------------------


def test_parse_dpkg_query():
    assert backends.parse_dpkg_query(fixture("dpkg-query.txt")) == {
        "bash": "5.2.15-2+b7", "libc6:amd64": "2.36-9+deb12u7", "libc6:i386": "2.36-9+deb12u7",
        "curl": "7.88.1-10+deb12u5"}
    # a Multi-Arch "same" package of the host's architecture is named as apt-get takes it
    assert backends.parse_dpkg_query(fixture("dpkg-query.txt"), "amd64") == {
        "bash": "5.2.15-2+b7", "libc6": "2.36-9+deb12u7", "libc6:i386": "2.36-9+deb12u7",
        "curl": "7.88.1-10+deb12u5"}


def test_parse_apt_cache_policy():
    assert backends.parse_apt_cache_policy(fixture("apt-cache-policy.txt")) == {
        "hello": "2.10-3", "curl": "7.88.1-10+deb12u8", "virtual-only": None}
    assert backends.parse_apt_cache_versions(fixture("apt-cache-policy.txt")) == {
        "hello": ["2.10-3"], "curl": ["7.88.1-10+deb12u8", "7.88.1-10+deb12u5"], "virtual-only": []}


def test_parse_rpm_query():
    assert backends.parse_rpm_query(fixture("rpm-qa.txt")) == {
        "bash": "5.2.15-5.fc39", "kernel-core": "6.5.12-300.fc39, 6.5.6-300.fc39",
        "perl-Errno": "1.37-502.fc39", "dbus": "1:1.14.10-1.fc39", "glibc": "2.38-14.fc39",
        "tzdata": "2024a-2.fc39"}
    assert backends.parse_rpm_query(fixture("rpm-qa.txt"), "x86_64") == {
        "bash": "5.2.15-5.fc39", "kernel-core": "6.5.12-300.fc39, 6.5.6-300.fc39",
        "perl-Errno": "1.37-502.fc39", "dbus": "1:1.14.10-1.fc39", "glibc": "2.38-14.fc39",
        "glibc.i686": "2.38-14.fc39", "tzdata": "2024a-2.fc39"}


def test_parse_dnf_and_yum_lists():
    assert backends.parse_yum_list(fixture("dnf-list-available.txt")) == {
        "hello": "2.12.1-2.fc39", "nginx": "1:1.24.0-4.fc39"}
    assert backends.parse_yum_list(fixture("yum-list-available.txt")) == {
        "hello": "2.10-1.el7", "python3-a-rather-long-package-name-that-wraps": "1.0.3-1.el7"}
    assert backends.parse_yum_list(fixture("yum-list-available.txt"), "i686") == {
        "hello.x86_64": "2.10-1.el7", "python3-a-rather-long-package-name-that-wraps": "1.0.3-1.el7"}
    assert backends.parse_yum_versions(fixture("dnf-list-available.txt"), "x86_64") == {
        "hello": ["2.12.1-2.fc39"], "nginx": ["1:1.24.0-4.fc39"]}


def test_parse_zypper():
    assert backends.parse_zypper_info(fixture("zypper-info.txt")) == {
        "hello": "2.12.1-1.6", "bash": "5.2.26-1.1"}
    assert backends.parse_zypper_search(fixture("zypper-search.xml"), "x86_64") == {
        "hello": ["2.12.1-1.6", "2.10-3.2"], "bash": ["5.2.15-5.fc39", "5.2.26-1.1"]}


def test_rpm_pins_match_as_dnf_and_zypper_read_them():
    dnf = backends.Dnf()
    for pin in ("1:1.24.0-4.fc39", "1:1.24.0", "1.24.0-4.fc39", "1.24.0"):
        assert dnf.pin_matches(pin, "1:1.24.0-4.fc39"), pin
    for pin in ("0:2.12.1-2.fc39", "2.12.1-2.fc39", "2.12.1"):
        assert dnf.pin_matches(pin, "2.12.1-2.fc39"), pin
    assert not dnf.pin_matches("2.12", "2.12.1-2.fc39")
    assert not dnf.pin_matches("2.12.1-1.fc39", "2.12.1-2.fc39")


def test_parse_apk():
    assert backends.parse_apk_info(fixture("apk-info.txt")) == {
        "alpine-baselayout": "3.4.3-r2", "busybox": "1.36.1-r15", "musl": "1.2.4_git20230717-r4",
        "ca-certificates-bundle": "20230506-r0", "curl": "8.4.0-r0"}
    assert backends.parse_apk_list(fixture("apk-list.txt")) == {
        "hello": "2.12.1-r0", "curl": "8.5.0-r0", "hello-doc": "2.12.1-r0"}


def test_parse_pacman():
    assert backends.parse_pacman_query(fixture("pacman-Q.txt")) == {
        "bash": "5.2.026-2", "glibc": "2.39-1", "curl": "8.6.0-3"}
    assert backends.parse_pacman_info(fixture("pacman-Si.txt")) == {
        "hello": "2.12.1-2", "curl": "8.7.1-1"}


def test_parse_brew():
    assert backends.parse_brew_list(fixture("brew-list-versions.txt")) == {
        "openssl@3": "3.3.0", "python@3.12": "3.12.3", "wget": "1.24.5", "node": "21.7.3, 22.1.0"}
    assert backends.parse_brew_info(fixture("brew-info.json")) == {
        "hello": "2.12.1", "wget": "1.24.5_1", "firefox": "125.0.3"}


# -- check mode of every manager, end to end on the recorded outputs -------------------

# executable -> [(an argument that picks the query, recorded output)]
RECORDED = {
    "dpkg-query": [("-W", "dpkg-query.txt")],
    "dpkg": [("--print-architecture", "dpkg-print-architecture.txt")],
    "apt-cache": [("policy", "apt-cache-policy.txt")],
    "rpm": [("-qa", "rpm-qa.txt"), ("--eval", "rpm-eval-arch.txt")],
    "dnf": [("list", "dnf-list-available.txt")],
    "yum": [("list", "yum-list-available.txt")],
    "zypper": [("info", "zypper-info.txt"), ("search", "zypper-search.xml")],
    "apk": [("info", "apk-info.txt"), ("list", "apk-list.txt")],
    "pacman": [("-Q", "pacman-Q.txt"), ("-Si", "pacman-Si.txt")],
    "brew": [("list", "brew-list-versions.txt"), ("info", "brew-info.json")],
}


@pytest.fixture
def recorded_managers(tmp_path, monkeypatch):
    """Stand-in executables that print the recorded outputs; anything else fails loudly."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "commands.log"
    for executable, queries in RECORDED.items():
        cases = "".join(f'  *" {arg} "*) cat "{FIXTURES / name}" ;;\n' for arg, name in queries)
        script = bin_dir / executable
        script.write_text(f'#!/bin/sh\necho "$0 $1" >> "{log}"\ncase " $* " in\n{cases}'
                          f'  *) echo "not a query: $*" >&2; exit 99 ;;\nesac\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.mark.parametrize("manager, packages, plan", [
    ("apt", ["hello", "curl"], {"installed": {"hello": "2.10-3"}}),
    ("dnf", ["hello", "bash"], {"installed": {"hello": "2.12.1-2.fc39"}}),
    ("yum", ["hello"], {"installed": {"hello": "2.10-1.el7"}}),
    ("zypper", ["hello", "bash"], {"installed": {"hello": "2.12.1-1.6"}}),
    ("apk", ["hello", "curl"], {"installed": {"hello": "2.12.1-r0"}}),
    ("pacman", ["hello", "bash"], {"installed": {"hello": "2.12.1-2"}}),
    ("brew", ["hello", "wget"], {"installed": {"hello": "2.12.1"}}),
])
def test_install_check_mode(recorded_managers, manager, packages, plan):
    result = install(*packages, check=True, manager=manager)
    assert result == dict({"changed": True, "check": True, "manager": manager,
                           "installed": {}, "upgraded": {}, "removed": {}}, **plan)


@pytest.mark.parametrize("manager, package, old, new", [
    ("apt", "curl", "7.88.1-10+deb12u5", "7.88.1-10+deb12u8"),
    ("zypper", "bash", "5.2.15-5.fc39", "5.2.26-1.1"),
    ("apk", "curl", "8.4.0-r0", "8.5.0-r0"),
    ("pacman", "curl", "8.6.0-3", "8.7.1-1"),
    ("brew", "wget", "1.24.5", "1.24.5_1"),
])
def test_latest_check_mode_plans_the_upgrade(recorded_managers, manager, package, old, new):
    result = latest(package, check=True, manager=manager)
    assert result["changed"] is True
    assert result["upgraded"] == {package: {"from": old, "to": new}}


@pytest.mark.parametrize("manager, installed_name", [
    ("apt", "bash"), ("dnf", "dbus"), ("apk", "busybox"), ("pacman", "glibc"), ("brew", "node")])
def test_remove_check_mode(recorded_managers, manager, installed_name):
    result = remove(installed_name, "not-installed", check=True, manager=manager)
    assert result["changed"] is True and list(result["removed"]) == [installed_name]


def test_check_mode_runs_queries_only(recorded_managers):
    install("hello", check=True, manager="dnf")
    assert [os.path.basename(line.split()[0]) for line in recorded_managers.read_text().splitlines()] \
        == ["rpm", "rpm", "dnf"]


@pytest.mark.parametrize("manager, package, installed_name", [
    ("apt", "libc6", "libc6"), ("apt", "libc6:amd64", "libc6"), ("apt", "libc6:native", "libc6"),
    ("apt", "libc6:i386", "libc6:i386"),
    ("dnf", "glibc", "glibc"), ("dnf", "glibc.x86_64", "glibc"), ("yum", "glibc.i686", "glibc.i686"),
    ("zypper", "tzdata.noarch", "tzdata"),
])
def test_architecture_qualified_names(recorded_managers, manager, package, installed_name):
    # the host's own architecture may be named or not; a foreign one is its own package
    assert install(package, check=True, manager=manager)["changed"] is False
    assert latest(package, check=True, manager=manager)["changed"] is False
    plan = remove(package, check=True, manager=manager)
    assert plan["changed"] is True and list(plan["removed"]) == [installed_name]


@pytest.mark.parametrize("manager, spec, plan", [
    ("apt", "curl=7.88.1-10+deb12u5", {}),
    ("apt", "curl=7.88.1-10+deb12u8", {"upgraded": {"curl": {"from": "7.88.1-10+deb12u5",
                                                              "to": "7.88.1-10+deb12u8"}}}),
    ("apt", "hello=2.10-3", {"installed": {"hello": "2.10-3"}}),
    ("dnf", "hello=2.12.1", {"installed": {"hello": "2.12.1-2.fc39"}}),
    ("dnf", "dbus=1.14.10", {}),
    ("yum", "hello=2.10-1.el7", {"installed": {"hello": "2.10-1.el7"}}),
    ("zypper", "hello=2.10-3.2", {"installed": {"hello": "2.10-3.2"}}),
    ("zypper", "bash=5.2.26-1.1", {"upgraded": {"bash": {"from": "5.2.15-5.fc39", "to": "5.2.26-1.1"}}}),
    ("apk", "hello=2.12.1-r0", {"installed": {"hello": "2.12.1-r0"}}),
])
def test_pinned_install_check_mode(recorded_managers, manager, spec, plan):
    result = install(spec, check=True, manager=manager)
    assert result == dict({"changed": bool(plan), "check": True, "manager": manager,
                           "installed": {}, "upgraded": {}, "removed": {}}, **plan)


@pytest.mark.parametrize("manager, spec, offered", [
    ("apt", "hello=0.0-bogus", "2.10-3"),
    ("apt", "curl=7.88.1-10", "7.88.1-10+deb12u8, 7.88.1-10+deb12u5"),
    ("dnf", "hello=2.12", "2.12.1-2.fc39"),
    ("yum", "hello=2.12.1", "2.10-1.el7"),
    ("zypper", "hello=2.11", "2.12.1-1.6, 2.10-3.2"),
    ("apk", "curl=8.4.0-r1", "8.5.0-r0"),
])
def test_pin_to_a_version_the_manager_lacks_fails_in_check_mode(recorded_managers, manager, spec, offered):
    name, _, version = spec.partition("=")
    with pytest.raises(PackageError, match=re.escape(
            f"{manager} offers no such version: {name}={version} (it has {offered})")):
        install(spec, check=True, manager=manager)


def test_nothing_to_do_is_not_changed(recorded_managers):
    result = install("bash", check=True, manager="pacman")
    assert result["changed"] is False and result["installed"] == {}


def test_unknown_package_fails_in_check_mode_as_it_would_for_real(recorded_managers):
    with pytest.raises(PackageError, match="dnf knows no package named 'no-such-package'"):
        install("no-such-package", check=True, manager="dnf")


@pytest.mark.parametrize("manager", ["pacman", "brew"])
def test_pins_are_refused_where_the_manager_has_none(recorded_managers, manager):
    with pytest.raises(PackageError, match=f"{manager} cannot install a chosen version"):
        install("hello=2.12.1", check=True, manager=manager)


@pytest.mark.parametrize("manager, argv", [
    ("apt", ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "-o",
             "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
             "install", "--allow-downgrades", "a", "b=1.0"]),
    ("dnf", ["dnf", "-y", "-q", "install", "a", "b-1.0"]),
    ("yum", ["yum", "-y", "-q", "install", "a", "b-1.0"]),
    ("zypper", ["zypper", "--non-interactive", "install", "--auto-agree-with-licenses", "a", "b=1.0"]),
    ("apk", ["apk", "add", "--no-progress", "a", "b=1.0"]),
])
def test_pinned_install_command_lines(manager, argv):
    assert backends.BACKENDS[manager]().install_argv([("a", None), ("b", "1.0")]) == argv


def test_pin_of_a_foreign_architecture_package():
    assert backends.Dnf().specs([("glibc.i686", "2.38-14.fc39"), ("python3.11", "3.11.9")]) == [
        "glibc-2.38-14.fc39.i686", "python3.11-3.11.9"]
    assert backends.Apt().specs([("libc6:i386", "2.36-9")]) == ["libc6:i386=2.36-9"]


# -- apt, for real -------------------------------------------------------------------------

def real_apt(test):
    # apt-get waits up to 300 s for dpkg's lock, then downloads: more than the
    # suite's usual bound on one test (pyproject.toml).
    return pytest.mark.timeout(1200)(pytest.mark.skipif(
        shutil.which("apt-get") is None or os.geteuid() != 0,
        reason="needs apt-get and root (CI runs as root on Debian)")(test))


def dpkg_version(name):
    out = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Version}", name],
                         capture_output=True, text=True).stdout
    return out[3:] if out.startswith("ii") else None


@pytest.fixture(scope="module")
def apt_host():
    """A root tunnel on this Debian machine, metadata at most a day old, without PACKAGE or LIBRARY."""
    def clean():
        for name in (PACKAGE, LIBRARY):
            if dpkg_version(name):
                subprocess.run(["apt-get", "-y", "-q", "remove", name], capture_output=True, check=True)

    with Local() as tunnel:
        tunnel.call(tasks.update_cache, max_age=24 * 3600)
        clean()
        yield tunnel
        clean()


@real_apt
def test_apt_update_cache_honours_max_age(apt_host):
    # the fixture left the metadata less than a day old: a day's max_age keeps it
    result = apt_host.call(tasks.update_cache, max_age=24 * 3600)
    assert result == {"changed": False, "check": False, "manager": "apt", "updated": False,
                      "age": result["age"]}
    assert 0 <= result["age"] < 24 * 3600
    assert apt_host.call(tasks.update_cache, max_age=0, check=True)["changed"] is True


@real_apt
def test_apt_update_cache_runs_when_too_old(apt_host):
    result = apt_host.call(tasks.update_cache, max_age=0)
    assert result["updated"] is True and result["manager"] == "apt"
    assert isinstance(result["changed"], bool)  # True only if the mirrors had new metadata
    assert apt_host.call(tasks.update_cache, max_age=3600)["updated"] is False


@real_apt
def test_apt_install_and_remove_for_real(apt_host):
    candidate = apt_host.call(backends.Apt().candidates, [PACKAGE])[PACKAGE]

    plan = apt_host.call(tasks.install, PACKAGE, check=True)
    assert plan == {"changed": True, "check": True, "manager": "apt",
                    "installed": {PACKAGE: candidate}, "upgraded": {}, "removed": {}}
    assert dpkg_version(PACKAGE) is None

    done = apt_host.call(tasks.install, PACKAGE)
    assert done["changed"] is True and done["installed"][PACKAGE] == candidate
    assert dpkg_version(PACKAGE) == candidate

    again = apt_host.call(tasks.install, PACKAGE)
    assert again["changed"] is False and again["installed"] == {}
    assert apt_host.call(tasks.latest, PACKAGE)["changed"] is False
    assert apt_host.call(tasks.install, f"{PACKAGE}={candidate}")["changed"] is False

    plan = apt_host.call(tasks.remove, PACKAGE, check=True)
    assert plan["changed"] is True and plan["removed"] == {PACKAGE: candidate}
    assert dpkg_version(PACKAGE) == candidate

    gone = apt_host.call(tasks.remove, PACKAGE)
    assert gone["changed"] is True and gone["removed"] == {PACKAGE: candidate}
    assert dpkg_version(PACKAGE) is None
    assert apt_host.call(tasks.remove, PACKAGE)["changed"] is False


@real_apt
def test_apt_latest_installs_a_missing_package(apt_host):
    result = apt_host.call(tasks.latest, PACKAGE)
    assert result["changed"] is True and PACKAGE in result["installed"]
    assert dpkg_version(PACKAGE) == result["installed"][PACKAGE]
    apt_host.call(tasks.remove, PACKAGE)


@real_apt
def test_apt_pin_to_a_version_apt_does_not_have_fails_clearly(apt_host):
    with pytest.raises(RemoteException) as info:
        apt_host.call(tasks.install, f"{PACKAGE}=0.0-not-a-version")
    assert info.value.type_name.endswith("PackageError")
    assert "apt-get" in info.value.msg and "failed with exit status 100" in info.value.msg
    assert dpkg_version(PACKAGE) is None


@real_apt
def test_apt_unknown_package(apt_host):
    with pytest.raises(RemoteException, match="apt knows no package named 'chopsticks-no-such-package'"):
        apt_host.call(tasks.install, "chopsticks-no-such-package", check=True)


@real_apt
def test_apt_pin_check_mode_fails_as_the_real_run_would(apt_host):
    with pytest.raises(RemoteException, match=re.escape(
            f"apt offers no such version: {PACKAGE}=0.0-not-a-version (it has ")):
        apt_host.call(tasks.install, f"{PACKAGE}=0.0-not-a-version", check=True)
    candidate = apt_host.call(backends.Apt().candidates, [PACKAGE])[PACKAGE]
    assert apt_host.call(tasks.install, f"{PACKAGE}={candidate}", check=True)["installed"] == {
        PACKAGE: candidate}
    assert dpkg_version(PACKAGE) is None


@real_apt
def test_apt_multiarch_same_package(apt_host):
    # dpkg names a Multi-Arch "same" library with its architecture; apt-get takes it with or without
    native = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert dpkg_version(LIBRARY) is None
    done = apt_host.call(tasks.install, LIBRARY)
    version = done["installed"][LIBRARY]
    assert dpkg_version(LIBRARY) == version

    for name in (LIBRARY, f"{LIBRARY}:{native}"):
        assert apt_host.call(tasks.install, name, check=True)["changed"] is False
        assert apt_host.call(tasks.install, name)["changed"] is False
        assert apt_host.call(tasks.latest, name, check=True)["changed"] is False
        plan = apt_host.call(tasks.remove, name, check=True)
        assert plan["changed"] is True and plan["removed"] == {LIBRARY: version}

    gone = apt_host.call(tasks.remove, f"{LIBRARY}:{native}")
    assert gone["changed"] is True and gone["removed"] == {LIBRARY: version}
    assert dpkg_version(LIBRARY) is None

    plan = apt_host.call(tasks.install, f"{LIBRARY}:{native}", check=True)
    assert plan["installed"] == {LIBRARY: version}
    done = apt_host.call(tasks.install, f"{LIBRARY}:{native}")
    assert done["installed"] == {LIBRARY: version} and dpkg_version(LIBRARY) == version
    assert apt_host.call(tasks.remove, LIBRARY)["removed"] == {LIBRARY: version}
    assert dpkg_version(LIBRARY) is None

"""chopsticks-facts: every fact, run on real hosts (Local tunnels, every remote
Python from 3.6 on), checked against independent sources on this machine
(uname, sysconf, statvfs, iproute2, findmnt, lsblk, /etc/os-release read by sh).
"""
import ast
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # CI installs the plugins (.ci/run); elsewhere they may be missing
    pytest.importorskip("chopsticks_facts", reason="pip install -e plugins/chopsticks-facts")

import chopsticks_facts
from chopsticks import Local, facts
from chopsticks_facts import _util, gather, storage, system

LINUX = sys.platform.startswith("linux")
linux_only = pytest.mark.skipif(not LINUX, reason="Linux facts")
FACT_NAMES = sorted(chopsticks_facts.FACTS)
SRC = Path(chopsticks_facts.__file__).resolve().parent


def sh(command):
    return subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout.strip()


def needs(tool):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed")


@pytest.fixture(scope="module")
def host():
    with Local() as tunnel:
        yield tunnel


@pytest.fixture(scope="module")
def gathered(host):
    """Every fact of this machine, in one round trip through a real tunnel."""
    return host.call(gather)


# -- every fact, through the tunnel --------------------------------------------


@pytest.mark.parametrize("name", FACT_NAMES)
def test_fact_is_registered_and_json_friendly(name, gathered):
    assert getattr(facts, name) is chopsticks_facts.FACTS[name]
    value = gathered[name]
    assert not (isinstance(value, dict) and set(value) == {"error"}), value
    assert json.loads(json.dumps(value)) == value


def test_each_fact_is_a_single_call(host):
    assert host.call(facts.kernel) == chopsticks_facts.kernel()


def test_every_fact_on_every_remote_python(remote_python):
    with Local(python=remote_python) as tunnel:
        values = tunnel.call(gather)
    failed = {k: v for k, v in values.items() if isinstance(v, dict) and set(v) == {"error"}}
    assert failed == {}
    assert values["python"]["executable"] == remote_python


def test_fact_modules_are_python36_syntax():
    for path in sorted(SRC.glob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 6))


def test_host_side_imports_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import chopsticks_facts; "
            "print(sorted(m.split('.')[0] for m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(SRC.parent)))
    imported = set(ast.literal_eval(out.stdout)) - {"chopsticks_facts"}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


# -- values against independent sources ------------------------------------------


def test_hostname(gathered):
    assert gathered["hostname"] == sh("uname -n")
    assert gathered["fqdn"] == socket.getfqdn()


def test_kernel(gathered):
    assert gathered["kernel"] == {"system": sh("uname -s"), "release": sh("uname -r"),
                                  "version": sh("uname -v"), "machine": sh("uname -m")}


@linux_only
def test_os_release_read_by_the_shell(gathered):
    release = gathered["os_release"]
    for key in ("ID", "VERSION_ID", "PRETTY_NAME", "NAME"):
        assert release.get(key.lower(), "") == sh(f". /etc/os-release; echo \"${key}\"")
    assert release["id_like"] == sh(". /etc/os-release; echo \"$ID_LIKE\"").split()
    if release["id"] == "debian":
        assert release["family"] == "debian"


@linux_only
@needs("nproc")
def test_cpu(gathered):
    cpu = gathered["cpu"]
    assert cpu["count"] == int(sh("nproc --all"))
    assert cpu["usable"] == int(sh("nproc"))
    assert cpu["architecture"] == sh("uname -m")


@linux_only
def test_memory_total_is_the_physical_pages(gathered):
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    memory = gathered["memory"]
    assert memory["total"] == total
    assert 0 < memory["available"] <= memory["total"]
    assert 0 <= memory["swap_free"] <= memory["swap_total"]


@linux_only
@needs("ip")
def test_ip_and_default_route_agree_with_iproute2(gathered):
    routes = json.loads(sh("ip -j -4 route show default"))
    if not routes:
        assert gathered["ip"] is None and gathered["default_route"]["ipv4"] is None
        return
    device = routes[0]["dev"]
    addresses = json.loads(sh(f"ip -j -4 addr show dev {device}"))[0]["addr_info"]
    assert gathered["ip"] == (routes[0].get("prefsrc") or addresses[0]["local"])
    ipv4 = gathered["default_route"]["ipv4"]
    assert (ipv4["interface"], ipv4["gateway"], ipv4["address"]) == (
        device, routes[0].get("gateway"), gathered["ip"])


@linux_only
@needs("ip")
def test_interfaces_agree_with_iproute2(gathered):
    links = json.loads(sh("ip -j addr show"))
    expected = {
        link["ifname"]: {
            "ipv4": [{"address": a["local"], "prefixlen": a["prefixlen"]}
                     for a in link["addr_info"] if a["family"] == "inet"],
            "ipv6": [{"address": a["local"], "prefixlen": a["prefixlen"]}
                     for a in link["addr_info"] if a["family"] == "inet6"],
            "mtu": link["mtu"], "index": link["ifindex"],
        } for link in links
    }
    found = {name: {k: v for k, v in entry.items() if k in ("ipv4", "ipv6", "mtu", "index")}
             for name, entry in gathered["interfaces"].items()}
    assert found == expected


@linux_only
@needs("findmnt")
def test_mounts_agree_with_findmnt_and_statvfs(host):
    mounts = host.call(facts.mounts)
    listed = set(sh("findmnt -rn -o TARGET").replace("\\x20", " ").splitlines())
    assert {m["mountpoint"] for m in mounts} <= listed
    root = next(m for m in mounts if m["mountpoint"] == "/")
    st = os.statvfs("/")
    assert root["size_total"] == st.f_blocks * st.f_frsize
    assert root["inodes_total"] == st.f_files
    assert root["error"] is None
    assert not any(m["fstype"] in ("proc", "sysfs", "cgroup", "cgroup2") for m in mounts)
    everything = host.call(facts.mounts, pseudo=True)
    assert any(m["fstype"] == "proc" for m in everything)


@linux_only
@needs("lsblk")
def test_disks_are_block_devices(gathered):
    names = set(sh("lsblk -dn -o NAME").split())
    assert set(gathered["disks"]) <= names
    for name, disk in gathered["disks"].items():
        assert disk["size"] == int(sh(f"lsblk -bdn -o SIZE /dev/{name}"))


def test_users_are_the_password_database(gathered):
    assert [u["name"] for u in gathered["users"]] == \
        [p.pw_name for p in sorted(pwd.getpwall(), key=lambda p: (p.pw_uid, p.pw_name))]
    root = next(u for u in gathered["users"] if u["uid"] == 0)
    assert root["name"] == "root"


def test_python_is_the_hosts_own(host):
    assert host.call(facts.python)["version_info"] == list(sys.version_info[:3])


def test_uptime_moves_forward(host):
    first = host.call(facts.uptime)
    assert 0 < first <= host.call(facts.uptime)


@linux_only
def test_package_manager(gathered):
    if shutil.which("apt-get") and gathered["os_release"]["family"] == "debian":
        assert gathered["package_manager"] == "apt"
    assert gathered["package_manager"] in {name for name, _ in system.PACKAGE_MANAGERS} | {None}


def test_service_manager(gathered):
    assert gathered["service_manager"] in ("systemd", "openrc", "runit", "sysvinit", "launchd", None)
    if os.path.isdir("/run/systemd/system"):
        assert gathered["service_manager"] == "systemd"
    # Installing Debian's runit package (as .ci/run does) creates /run/runit on
    # a host whose init is not runit: PID 1 decides, not that directory.
    with open("/proc/1/comm") as comm:
        if comm.read().strip() not in ("runit", "runsvdir"):
            assert gathered["service_manager"] != "runit"


@linux_only
def test_virtualization(gathered):
    value = gathered["virtualization"]
    assert set(value) == {"container", "hypervisor"}
    try:
        init_environ = Path("/proc/1/environ").read_text(errors="replace")
    except OSError:  # not readable in some sandboxes, even by root: the fact skips it too
        init_environ = ""
    if os.path.exists("/.dockerenv") and "container=" not in init_environ:
        assert value["container"] == "docker"


# -- gather: several facts, one round trip, one timeout each ----------------------


def never_returns():
    """A fact that hangs, as statvfs on a dead NFS server does."""
    threading.Event().wait(600)


def test_gather_answers_only_what_was_asked(host):
    assert host.call(gather, ["kernel", "hostname"]) == {
        "kernel": chopsticks_facts.kernel(), "hostname": chopsticks_facts.hostname()}
    assert host.call(gather, "kernel") == {"kernel": chopsticks_facts.kernel()}


def test_gather_reports_each_failure_beside_the_answers(host):
    result = host.call(gather, ["kernel", "nope", "test_facts:never_returns"],
                       {"test_facts:never_returns": 0.3})
    assert result["kernel"] == chopsticks_facts.kernel()
    assert result["nope"]["error"].startswith("LookupError: chopsticks-facts has no fact 'nope'")
    assert result["test_facts:never_returns"] == {
        "error": "TimeoutError: test_facts:never_returns did not answer within 0.3s"}
    assert list(result) == ["kernel", "nope", "test_facts:never_returns"]


def test_gather_takes_another_plugins_fact_by_reference(host):
    assert host.call(gather, ["os:getpid"])["os:getpid"] != os.getpid()


# -- mounts: a dead mount costs one entry, not the host ------------------------------


def test_a_mount_that_hangs_times_out_alone():
    release = threading.Event()

    def usage(mountpoint):
        if mountpoint == "/dead-nfs":
            release.wait(600)
        return storage._usage("/")

    entries = [{"device": "srv:/export", "mountpoint": "/dead-nfs", "fstype": "nfs4", "options": []},
               {"device": "/dev/root", "mountpoint": "/", "fstype": "ext4", "options": []}]
    try:
        dead, root = storage.measure(entries, 0.3, usage=usage)
    finally:
        release.set()
    assert dead["error"] == "statvfs did not answer within 0.3s" and dead["size_total"] is None
    assert root["error"] is None and root["size_total"] == storage._usage("/")["size_total"]


def test_network_and_automount_filesystems_are_skipped_by_default():
    for fstype in ("nfs", "nfs4", "cifs", "fuse.sshfs", "autofs"):
        assert fstype in storage.NETWORK_FILESYSTEMS | storage.AUTOMOUNT_FILESYSTEMS


# -- parsers of the files facts read -------------------------------------------------


def test_parse_os_release_quoting():
    text = ('NAME="Fedora Linux"\nVERSION_ID=39\nPRETTY_NAME=\'Fedora 39\'\n'
            '# comment\nID_LIKE="rhel centos"\nQUOTED="say \\"hi\\""\n\n')
    assert system.parse_os_release(text) == {
        "name": "Fedora Linux", "version_id": "39", "pretty_name": "Fedora 39",
        "id_like": "rhel centos", "quoted": 'say "hi"'}


def test_parse_meminfo():
    assert system.parse_meminfo("MemTotal:       16318792 kB\nHugePages_Total:       0\n") == {
        "MemTotal": 16318792 * 1024, "HugePages_Total": 0}


def test_parse_proc_mounts_unescapes():
    text = "/dev/sdb1 /media/My\\040Disk vfat rw,relatime 0 0\n"
    assert storage.parse_proc_mounts(text) == [{
        "device": "/dev/sdb1", "mountpoint": "/media/My Disk", "fstype": "vfat",
        "options": ["rw", "relatime"]}]


def test_parse_macos_mount():
    text = ("/dev/disk3s1s1 on / (apfs, sealed, local, read-only, journaled)\n"
            "map auto_home on /System/Volumes/Data/home (autofs, automounted, nobrowse)\n")
    assert storage.parse_macos_mount(text) == [
        {"device": "/dev/disk3s1s1", "mountpoint": "/", "fstype": "apfs",
         "options": ["sealed", "local", "read-only", "journaled"]},
        {"device": "map auto_home", "mountpoint": "/System/Volumes/Data/home", "fstype": "autofs",
         "options": ["automounted", "nobrowse"]}]


def test_unsupported_platform_error_names_it():
    error = _util.unsupported("disks")
    assert isinstance(error, NotImplementedError)
    assert str(error).startswith("the fact 'disks' supports Linux; this host runs ")
    assert str(_util.unsupported("memory")).startswith("the fact 'memory' supports Linux and macOS")


def test_which_finds_commands_as_shutil_does(tmp_path, monkeypatch):
    # package_manager looks the managers up with _util.which (no shutil on the host).
    (tmp_path / "dir" / "apt-get").mkdir(parents=True)  # a directory: not a command
    tool = tmp_path / "bin" / "apt-get"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    unexecutable = tmp_path / "noexec" / "dnf"
    unexecutable.parent.mkdir()
    unexecutable.write_text("")
    path = os.pathsep.join(str(tmp_path / d) for d in ("dir", "noexec", "bin"))
    monkeypatch.setenv("PATH", path)
    for name in ("apt-get", "dnf", "sh"):
        assert _util.which(name) == shutil.which(name, path=path)
    assert _util.which("apt-get") == str(tool)

"""Facts about the operating system, hardware and software of a host.

Runs on the host: standard library only, Python 3.6+.
"""
import os
import sys
import time

from chopsticks_facts._util import LINUX, MACOS, read_text, run, unsupported, which

_KIB = 1024


def hostname():
    """The host's name as it calls itself (``socket.gethostname()``): ``'web1'``."""
    import socket

    return socket.gethostname()


def fqdn():
    """The fully qualified domain name (``socket.getfqdn()``; may ask DNS): ``'web1.example.com'``."""
    import socket

    return socket.getfqdn()


# os_release()['family']: the family of each distribution ID and ID_LIKE entry.
_FAMILIES = {
    "debian": "debian", "ubuntu": "debian", "raspbian": "debian", "linuxmint": "debian",
    "rhel": "redhat", "fedora": "redhat", "centos": "redhat", "rocky": "redhat",
    "almalinux": "redhat", "ol": "redhat", "amzn": "redhat",
    "suse": "suse", "opensuse": "suse", "sles": "suse", "opensuse-leap": "suse",
    "opensuse-tumbleweed": "suse",
    "arch": "arch", "manjaro": "arch", "alpine": "alpine", "gentoo": "gentoo",
}


def parse_os_release(text):
    """The ``os-release(5)`` format as a dict with lower-case keys."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
            if line.split("=", 1)[1][0] == '"':
                for escaped in ('\\"', "\\\\", "\\$", "\\`"):
                    value = value.replace(escaped, escaped[1])
        values[key.lower()] = value
    return values


def os_release():
    """The distribution, from ``/etc/os-release``.

    A dict with lower-case keys of os-release(5) (``id``, ``name``,
    ``version_id``, ``pretty_name``, ``version_codename``, ...) where
    ``id_like`` is a list, plus ``family``: ``'debian'``, ``'redhat'``,
    ``'suse'``, ``'arch'``, ``'alpine'``, ``'gentoo'``, ``'darwin'`` or ``None``.
    """
    if MACOS:
        import platform

        version = platform.mac_ver()[0]
        return {"id": "macos", "name": "macOS", "version_id": version,
                "pretty_name": "macOS %s" % version, "id_like": [], "family": "darwin"}
    if not LINUX:
        raise unsupported("os_release")
    text = read_text("/etc/os-release") or read_text("/usr/lib/os-release") or ""
    values = parse_os_release(text)
    values["id_like"] = values.get("id_like", "").split()
    values["family"] = None
    for candidate in [values.get("id", "")] + values["id_like"]:
        if candidate in _FAMILIES:
            values["family"] = _FAMILIES[candidate]
            break
    return values


def kernel():
    """The kernel, from ``uname``: ``{'system': 'Linux', 'release', 'version', 'machine'}``."""
    uname = os.uname()
    return {"system": uname.sysname, "release": uname.release,
            "version": uname.version, "machine": uname.machine}


def _sysctl(name):
    return run(["sysctl", "-n", name]).strip()


def cpu():
    """The processors.

    ``{'architecture': 'x86_64', 'count': 8, 'usable': 8, 'model': str or None,
    'sockets': int or None, 'cores': int or None}``: ``count`` is logical
    CPUs, ``usable`` those this process may run on (affinity, cgroups'
    cpusets), ``cores`` physical cores over all ``sockets``.
    """
    import platform

    info = {"architecture": platform.machine(), "count": os.cpu_count(),
            "usable": os.cpu_count(), "model": None, "sockets": None, "cores": None}
    if hasattr(os, "sched_getaffinity"):
        info["usable"] = len(os.sched_getaffinity(0))
    if MACOS:
        info["model"] = _sysctl("machdep.cpu.brand_string") or None
        info["cores"] = int(_sysctl("hw.physicalcpu"))
        info["sockets"] = int(_sysctl("hw.packages"))
        return info
    if not LINUX:
        raise unsupported("cpu")
    cores = set()
    sockets = set()
    for block in (read_text("/proc/cpuinfo") or "").split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if info["model"] is None:
            info["model"] = fields.get("model name") or fields.get("Model") or fields.get("cpu") or None
        if "physical id" in fields:
            sockets.add(fields["physical id"])
            cores.add((fields["physical id"], fields.get("core id")))
    if sockets:
        info["sockets"], info["cores"] = len(sockets), len(cores)
    return info


def parse_meminfo(text):
    """``/proc/meminfo`` as ``{key: bytes}``."""
    values = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (_KIB if parts[1:] == ["kB"] else 1)
    return values


def memory():
    """Memory in bytes.

    ``{'total', 'available', 'free', 'swap_total', 'swap_free'}``;
    ``available`` is what can be allocated without swapping (the kernel's
    estimate, MemAvailable).  On macOS only ``total`` is known; the rest are ``None``.
    """
    if MACOS:
        return {"total": int(_sysctl("hw.memsize")), "available": None, "free": None,
                "swap_total": None, "swap_free": None}
    if not LINUX:
        raise unsupported("memory")
    info = parse_meminfo(read_text("/proc/meminfo") or "")
    return {"total": info.get("MemTotal"), "available": info.get("MemAvailable"),
            "free": info.get("MemFree"), "swap_total": info.get("SwapTotal"),
            "swap_free": info.get("SwapFree")}


def users():
    """The accounts in the password database, by uid.

    A list of ``{'name', 'uid', 'gid', 'gecos', 'home', 'shell'}``.
    """
    import pwd

    return [{"name": p.pw_name, "uid": p.pw_uid, "gid": p.pw_gid, "gecos": p.pw_gecos,
             "home": p.pw_dir, "shell": p.pw_shell}
            for p in sorted(pwd.getpwall(), key=lambda p: (p.pw_uid, p.pw_name))]


def python():
    """The Python running the fact: ``{'version': '3.11.7', 'version_info': [3, 11, 7],
    'implementation': 'CPython', 'executable', 'prefix'}``."""
    import platform

    return {"version": platform.python_version(), "version_info": list(sys.version_info[:3]),
            "implementation": platform.python_implementation(),
            "executable": sys.executable, "prefix": sys.prefix}


def uptime():
    """Seconds since the host booted, as a float."""
    if LINUX:
        return float((read_text("/proc/uptime") or "0").split()[0])
    if MACOS:  # "{ sec = 1700000000, usec = 0 } Thu Nov 14 ..."
        boot = _sysctl("kern.boottime")
        return time.time() - float(boot.split("sec =")[1].split(",")[0])
    raise unsupported("uptime")


# The package managers chopsticks-pkg knows: name -> the executable that shows it is there.
PACKAGE_MANAGERS = (("apt", "apt-get"), ("dnf", "dnf"), ("yum", "yum"), ("zypper", "zypper"),
                    ("apk", "apk"), ("pacman", "pacman"), ("brew", "brew"))
_PREFERRED = {"debian": "apt", "redhat": "dnf", "suse": "zypper", "alpine": "apk",
              "arch": "pacman", "darwin": "brew"}


def package_manager():
    """The host's package manager: ``'apt'``, ``'dnf'``, ``'yum'``, ``'zypper'``,
    ``'apk'``, ``'pacman'``, ``'brew'``, or ``None``.

    The one native to the distribution family wins when it is installed (a
    Debian host with ``dnf`` installed is still ``'apt'``).
    """
    executables = dict(PACKAGE_MANAGERS)
    try:
        family = os_release().get("family")
    except NotImplementedError:
        family = None
    preferred = _PREFERRED.get(family)
    order = ([preferred] if preferred else []) + [name for name, _ in PACKAGE_MANAGERS]
    for name in order:
        if which(executables[name]):
            return name
    return None


def service_manager():
    """The init system: ``'systemd'``, ``'openrc'``, ``'runit'``, ``'sysvinit'``,
    ``'launchd'``, or ``None`` (say, a container whose first process is an application)."""
    if MACOS:
        return "launchd"
    if not LINUX:
        raise unsupported("service_manager")
    if os.path.isdir("/run/systemd/system"):
        return "systemd"
    init = read_text("/proc/1/comm")
    if init == "systemd":
        return "systemd"
    # PID 1's name decides; /run/runit alone is no proof (Debian's runit
    # package creates it on a host whose init is something else).
    if init in ("runit", "runsvdir") or (init is None and os.path.isdir("/run/runit")):
        return "runit"
    if os.path.exists("/run/openrc") or init == "openrc-init":
        return "openrc"
    if init == "init" and os.path.isdir("/etc/init.d"):
        return "sysvinit"
    return None


# (file under /sys/class/dmi/id, text in it) -> hypervisor
_DMI_HYPERVISORS = (
    ("sys_vendor", "QEMU", "kvm"), ("product_name", "KVM", "kvm"),
    ("sys_vendor", "VMware", "vmware"), ("product_name", "VirtualBox", "virtualbox"),
    ("sys_vendor", "innotek", "virtualbox"), ("sys_vendor", "Xen", "xen"),
    ("product_name", "Virtual Machine", "hyperv"), ("sys_vendor", "Amazon EC2", "amazon"),
    ("product_name", "Google Compute Engine", "google"), ("sys_vendor", "Parallels", "parallels"),
    ("bios_vendor", "Firecracker", "firecracker"), ("sys_vendor", "OpenStack", "openstack"),
)


def _container():
    environ = (read_text("/proc/1/environ") or "").split("\0")
    for item in environ:
        if item.startswith("container="):
            return item.split("=", 1)[1] or None
    if os.path.exists("/run/.containerenv"):
        return "podman"
    if os.path.exists("/.dockerenv"):
        return "docker"
    cgroup = read_text("/proc/1/cgroup") or ""
    for marker, name in (("kubepods", "kubernetes"), ("docker", "docker"),
                         ("lxc", "lxc"), ("libpod", "podman")):
        if marker in cgroup:
            return name
    if "microsoft" in (read_text("/proc/sys/kernel/osrelease") or "").lower():
        return "wsl"
    return None


def _hypervisor():
    for filename, marker, name in _DMI_HYPERVISORS:
        if marker in (read_text("/sys/class/dmi/id/" + filename) or ""):
            return name
    if os.path.exists("/proc/xen"):
        return "xen"
    flags = [line for line in (read_text("/proc/cpuinfo") or "").splitlines()
             if line.startswith("flags")]
    if flags and " hypervisor" in flags[0]:
        return "unknown"
    return None


def virtualization():
    """Whether the host is a container or a virtual machine.

    ``{'container': 'docker' | 'podman' | 'lxc' | 'kubernetes' |
    'systemd-nspawn' | 'wsl' | ... | None, 'hypervisor': 'kvm' | 'vmware' |
    'virtualbox' | 'xen' | 'hyperv' | 'amazon' | 'google' | 'firecracker' |
    ... | 'unknown' | None}``: ``'unknown'`` when the CPU says it runs under
    a hypervisor that nothing else names.
    """
    if MACOS:
        vmm = run(["sysctl", "-n", "kern.hv_vmm_present"]).strip() == "1"
        return {"container": None, "hypervisor": "unknown" if vmm else None}
    if not LINUX:
        raise unsupported("virtualization")
    return {"container": _container(), "hypervisor": _hypervisor()}

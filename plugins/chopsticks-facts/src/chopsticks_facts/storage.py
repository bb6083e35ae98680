"""Facts about a host's storage: mounted filesystems and block devices.

``statvfs`` on a dead NFS server blocks in the kernel, where no signal or
alarm reaches it (Ansible's ``setup`` hangs there); so each mount is measured
in its own thread with its own timeout, and network and automount
filesystems are skipped unless asked for.  Runs on the host: standard
library only, Python 3.6+.
"""
import os
import time

from chopsticks_facts._util import LINUX, MACOS, Job, read_text, run, unsupported

#: Filesystems reached over the network: skipped unless ``network=True``.
NETWORK_FILESYSTEMS = frozenset((
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs", "9p",
    "lustre", "gpfs", "davfs", "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "fuse.rclone",
    "fuse.gcsfuse", "fuse.davfs2",
))
#: Automount points: statvfs would trigger the mount.  Skipped unless ``network=True``.
AUTOMOUNT_FILESYSTEMS = frozenset(("autofs", "automount"))
#: Kernel interfaces rather than storage: skipped unless ``pseudo=True``.
PSEUDO_FILESYSTEMS = frozenset((
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs",
    "securityfs", "pstore", "bpf", "configfs", "fusectl", "hugetlbfs", "binfmt_misc",
    "rpc_pipefs", "nsfs", "efivarfs", "selinuxfs", "devtmpfs", "overlay_internal",
))

_OCTAL_ESCAPE = r"\\([0-7]{3})"


def _unescape(field):
    # /proc/self/mounts writes space, tab, newline and backslash as \040 etc.
    import re  # here: a host that only wants the package manager skips it

    return re.sub(_OCTAL_ESCAPE, lambda m: chr(int(m.group(1), 8)), field)


def parse_proc_mounts(text):
    """``/proc/self/mounts`` (fstab(5) format) as a list of dicts, in mount order."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            entries.append({"device": _unescape(fields[0]), "mountpoint": _unescape(fields[1]),
                            "fstype": fields[2], "options": fields[3].split(",")})
    return entries


def parse_macos_mount(text):
    """``mount`` output on macOS (``/dev/disk1s1 on / (apfs, local, journaled)``)."""
    import re

    entries = []
    for line in text.splitlines():
        match = re.match(r"^(.*) on (.*) \(([^,)]*)(?:, (.*))?\)$", line)
        if match:
            device, mountpoint, fstype, options = match.groups()
            entries.append({"device": device, "mountpoint": mountpoint, "fstype": fstype,
                            "options": options.split(", ") if options else []})
    return entries


def _usage(mountpoint):
    st = os.statvfs(mountpoint)
    return {"size_total": st.f_blocks * st.f_frsize, "size_free": st.f_bfree * st.f_frsize,
            "size_available": st.f_bavail * st.f_frsize,
            "inodes_total": st.f_files, "inodes_free": st.f_ffree}


_NO_USAGE = {"size_total": None, "size_free": None, "size_available": None,
             "inodes_total": None, "inodes_free": None}


def measure(entries, statvfs_timeout, usage=_usage):
    """Add sizes to mount entries, each ``statvfs`` in its own thread and timeout.

    A mount that does not answer within ``statvfs_timeout`` seconds (or
    fails) gets ``None`` sizes and an ``error``; the others are unaffected.
    """
    jobs = [Job(usage, (entry["mountpoint"],)).start() for entry in entries]
    # Every job is already running: waiting for one in turn bounds the whole at one timeout.
    deadline = time.time() + statvfs_timeout
    result = []
    for entry, job in zip(entries, jobs):
        entry = dict(entry)
        try:
            entry.update(job.result(max(0.0, deadline - time.time())))
            entry["error"] = None
        except TimeoutError:
            entry.update(_NO_USAGE)
            entry["error"] = "statvfs did not answer within %gs" % statvfs_timeout
        except OSError as exc:
            entry.update(_NO_USAGE)
            entry["error"] = "statvfs failed: %s" % exc
        result.append(entry)
    return result


def mounts(network=False, pseudo=False, statvfs_timeout=2.0):
    """Mounted filesystems with their sizes in bytes.

    A list, in mount order, of ``{'device', 'mountpoint', 'fstype',
    'options': [...], 'size_total', 'size_free', 'size_available',
    'inodes_total', 'inodes_free', 'error'}``.  Network and automount
    filesystems are left out unless ``network=True``; kernel pseudo
    filesystems (proc, sysfs, cgroup, ...) unless ``pseudo=True``.  Each
    mount is measured with its own ``statvfs_timeout`` (seconds): one that
    does not answer has ``None`` sizes and ``error`` says why.
    """
    if LINUX:
        entries = parse_proc_mounts(read_text("/proc/self/mounts") or "")
    elif MACOS:
        entries = parse_macos_mount(run(["mount"]))
    else:
        raise unsupported("mounts")
    kept = []
    for entry in entries:
        fstype = entry["fstype"]
        if not network and (fstype in NETWORK_FILESYSTEMS or fstype in AUTOMOUNT_FILESYSTEMS):
            continue
        if not pseudo and fstype in PSEUDO_FILESYSTEMS:
            continue
        kept.append(entry)
    return measure(kept, statvfs_timeout)


def _block_device(path):
    size = read_text(os.path.join(path, "size"))
    return {"name": os.path.basename(path), "size": int(size) * 512 if size and size.isdigit() else None}


def disks():
    """Block devices (not loop, ram or zram devices), by name.

    ``{'vda': {'size': bytes, 'model': str or None, 'vendor': str or None,
    'rotational': bool or None, 'removable': bool or None, 'partitions':
    [{'name', 'size'}]}}``.
    """
    if not LINUX:
        raise unsupported("disks")
    result = {}
    base = "/sys/block"
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if name.startswith(("loop", "ram", "zram")):
            continue
        path = os.path.join(base, name)
        rotational = read_text(os.path.join(path, "queue", "rotational"))
        removable = read_text(os.path.join(path, "removable"))
        result[name] = {
            "size": _block_device(path)["size"],
            "model": read_text(os.path.join(path, "device", "model")) or None,
            "vendor": read_text(os.path.join(path, "device", "vendor")) or None,
            "rotational": rotational == "1" if rotational in ("0", "1") else None,
            "removable": removable == "1" if removable in ("0", "1") else None,
            "partitions": [_block_device(os.path.join(path, child)) for child in sorted(os.listdir(path))
                           if os.path.exists(os.path.join(path, child, "partition"))],
        }
    return result

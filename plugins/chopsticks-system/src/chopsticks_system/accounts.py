"""Users and groups: what the host's account databases say, and the tools that change them.

Reads through :mod:`pwd` and :mod:`grp` (and /etc/shadow for a password
hash); changes through the host's own tools: shadow-utils' ``useradd``,
``usermod``, ``userdel``, ``groupadd``, ``groupmod``, ``groupdel`` and
``chpasswd``, or BusyBox's ``adduser``, ``deluser``, ``addgroup``,
``delgroup`` and ``chpasswd`` where ``useradd`` is missing (Alpine).
Runs on the host: standard library only, Python 3.6+.
"""
import grp
import pwd
import shutil

from chopsticks_system._run import bad, run

SHADOW = "/etc/shadow"


def tools():
    """``'shadow'`` (useradd and friends) or ``'busybox'`` (adduser, addgroup)."""
    if shutil.which("useradd"):
        return "shadow"
    if shutil.which("adduser") and shutil.which("addgroup"):
        return "busybox"
    raise bad("user", "name", None, "neither useradd nor BusyBox adduser is installed")


# -- reading --------------------------------------------------------------------------


def group_entry(name_or_id):
    """The grp entry for a group name or id (an int or a string of digits), or None."""
    try:
        if isinstance(name_or_id, int) or str(name_or_id).isdigit():
            return grp.getgrgid(int(name_or_id))
        return grp.getgrnam(name_or_id)
    except KeyError:
        return None


def group_state(name):
    """``{'gid': int}`` or None when the group does not exist."""
    try:
        return {"gid": grp.getgrnam(name).gr_gid}
    except KeyError:
        return None


def supplementary_groups(user):
    """Sorted names of the groups that list ``user`` as a member."""
    return sorted(g.gr_name for g in grp.getgrall() if user in g.gr_mem)


def password_hash(user, shadow=SHADOW):
    """The hash field of ``user`` in the shadow file (None if no such line)."""
    with open(shadow) as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            if fields[0] == user and len(fields) > 1:
                return fields[1]
    return None


def user_state(name):
    """``{'uid', 'group', 'groups', 'shell', 'home'}`` or None when the user does not exist.

    ``group`` is the primary group's name (its id as a string when no group
    has that id); ``groups`` the supplementary groups, sorted.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    primary = group_entry(entry.pw_gid)
    return {"uid": entry.pw_uid, "group": primary.gr_name if primary else str(entry.pw_gid),
            "groups": [g for g in supplementary_groups(name) if not primary or g != primary.gr_name],
            "shell": entry.pw_shell, "home": entry.pw_dir}


# -- command lines --------------------------------------------------------------------


def useradd_argv(name, uid=None, group=None, groups=(), shell=None, home=None,
                 create_home=True, system=False, toolset="shadow"):
    """The command that creates a user (supplementary groups with BusyBox come after)."""
    if toolset == "busybox":
        argv = ["adduser", "-D"]
        argv += ["-u", str(uid)] if uid is not None else []
        argv += ["-G", group] if group is not None else []
        argv += ["-s", shell] if shell is not None else []
        argv += ["-h", home] if home is not None else []
        argv += [] if create_home else ["-H"]
        argv += ["-S"] if system else []
        return argv + [name]
    argv = ["useradd"]
    argv += ["-u", str(uid)] if uid is not None else []
    argv += ["-g", group] if group is not None else []
    argv += ["-G", ",".join(groups)] if groups else []
    argv += ["-s", shell] if shell is not None else []
    argv += ["-d", home] if home is not None else []
    argv += ["-m"] if create_home else ["-M"]
    argv += ["-r"] if system else []
    return argv + [name]


def usermod_argv(name, changes):
    """``usermod`` for the changed attributes: ``{'uid': 5, 'groups': (names, append)}``."""
    argv = ["usermod"]
    for attribute, flag in (("uid", "-u"), ("group", "-g"), ("shell", "-s"), ("home", "-d")):
        if attribute in changes:
            argv += [flag, str(changes[attribute])]
    if "groups" in changes:
        names, append = changes["groups"]
        argv += (["-a"] if append else []) + ["-G", ",".join(names)]
    return argv + [name]


def groupadd_argv(name, gid=None, system=False, toolset="shadow"):
    if toolset == "busybox":
        return ["addgroup"] + (["-g", str(gid)] if gid is not None else []) + \
            (["-S"] if system else []) + [name]
    return ["groupadd"] + (["-g", str(gid)] if gid is not None else []) + \
        (["-r"] if system else []) + [name]

"""chopsticks-system: idempotent service, user and group tasks.

``service``, ``user`` and ``group`` run on the host (through chopsticks'
import hook: standard library only, Python 3.6+).  Each returns a plain
dict::

    {'changed': bool, 'check': bool, 'name': 'nginx',
     'before': {...}, 'after': {...}, ...}

``changed`` comes from the host's state read before and after (``pwd``,
``grp``, /etc/shadow, the service manager's status), never from a tool's
messages; with ``check=True`` nothing changes and ``after`` is the plan.
Bad input (an unknown service, an unknown group, a failing command) raises
:class:`TaskError` naming the task, the argument and its value; chopsticks
adds the host.
"""
from chopsticks_system import accounts
from chopsticks_system._run import TaskError, bad, run
from chopsticks_system.services import MANAGERS, Manager, get_manager

__version__ = "2.0.0"
__all__ = ["service", "user", "group", "TaskError", "MANAGERS", "Manager", "TASKS", "plan_service"]

STATES = ("started", "stopped", "restarted", "reloaded")


def _check_choice(task, argument, value, choices):
    if value not in choices:
        raise bad(task, argument, value, "must be one of %s" % ", ".join(repr(c) for c in choices))


def _check_name(task, argument, name):
    if not isinstance(name, str) or not name or any(c in name for c in ":,\n\t ") or name.startswith("-"):
        raise bad(task, argument, name, "not a valid name (empty, or has ':', ',', whitespace "
                  "or a leading '-')")


def _check_id(task, argument, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise bad(task, argument, value, "must be a non-negative integer")


# -- service ---------------------------------------------------------------------------


def plan_service(status, state=None, enabled=None):
    """The actions that take a service from ``status`` (``{'running', 'enabled'}``)
    to the wanted state, in order: ``enable``/``disable`` first, then
    ``start``, ``stop``, ``restart`` or ``reload`` (a stopped service asked to
    reload is started)."""
    actions = []
    if enabled is not None and status["enabled"] != enabled:
        actions.append("enable" if enabled else "disable")
    if state == "started" and not status["running"]:
        actions.append("start")
    elif state == "stopped" and status["running"]:
        actions.append("stop")
    elif state == "restarted":
        actions.append("restart")
    elif state == "reloaded":
        actions.append("reload" if status["running"] else "start")
    return actions


def _predict(manager, before, state, enabled, actions):
    after = dict(before)
    if enabled is not None:
        after["enabled"] = enabled
        if "disable" in actions and manager.name in ("runit", "launchd"):
            after["running"] = False  # runit stops what it no longer supervises; unload -w stops
    if state in ("started", "restarted", "reloaded"):
        after["running"] = True
    elif state == "stopped":
        after["running"] = False
    return after


def service(name, *, state=None, enabled=None, check=False, manager=None):
    """Make sure a service is running or stopped, enabled at boot or not, or restart or reload it.

    :param name: the service's name in its manager (a systemd unit, an init
        script in /etc/init.d, a runit service in /etc/sv, a launchd label).
    :param state: ``'started'`` and ``'stopped'`` change only what needs it;
        ``'restarted'`` and ``'reloaded'`` always act and always report
        ``changed``; ``None`` leaves the running state alone.
    :param enabled: ``True``/``False`` to start the service at boot or not;
        ``None`` leaves it alone.
    :param manager: ``'systemd'``, ``'openrc'``, ``'runit'``, ``'sysvinit'``,
        ``'launchd'`` or a :class:`Manager`; by default the host's own (the
        ``service_manager`` fact).
    :return: ``{'changed', 'check', 'manager', 'name', 'actions': [...],
        'before': {'running', 'enabled'}, 'after': {'running', 'enabled'}}``.
        In check mode an unknown service is planned from "stopped and
        disabled" with a ``warnings`` entry (an earlier task of the
        deployment may install it); a real run raises.
    """
    if not isinstance(name, str) or not name or "\n" in name:
        raise bad("service", "name", name, "must be a service name")
    if state is not None:
        _check_choice("service", "state", state, STATES)
    if enabled not in (None, True, False):
        raise bad("service", "enabled", enabled, "must be True, False or None")
    backend = get_manager(manager)
    warnings = []
    try:
        status = backend.status(name)
    except TaskError as exc:
        # In check mode an unknown service is a warning: a deployment's earlier
        # package task would install it, and its plan installs nothing.
        if not (check and getattr(exc, "unknown_service", False)):
            raise
        warnings.append("%s (yet: an earlier task must install it)" % exc)
        status = None
    before = _running_enabled(status or {"running": False, "enabled": False})
    actions = plan_service(before, state, enabled)
    if status is not None:
        backend.check_plan(name, status, actions)
    if check:
        after = _predict(backend, before, state, enabled, actions)
    else:
        done = []
        for action in [a for a in actions if a in ("enable", "disable")]:
            backend.act(name, action)
            done.append(action)
        # Enabling starts the service under runit and launchd: look again.
        current = _status(backend, name) if done else before
        for action in plan_service(current, state, None):
            backend.act(name, action)
            done.append(action)
        actions = done
        final = backend.status(name)
        after = _running_enabled(final)
        _verify(backend, name, after, state, enabled, final.get("detail"))
    changed = after != before or any(a in ("restart", "reload") for a in actions)
    result = {"changed": changed, "check": check, "manager": backend.name, "name": name,
              "actions": actions, "before": before, "after": after}
    return _with_warnings(result, warnings)


def _status(backend, name):
    return _running_enabled(backend.status(name))


def _running_enabled(status):
    return {"running": bool(status["running"]), "enabled": bool(status["enabled"])}


def _verify(backend, name, after, state, enabled, detail):
    want_running = {"started": True, "restarted": True, "reloaded": True, "stopped": False}.get(state)
    if want_running is not None and after["running"] != want_running:
        raise bad("service", "state", state, "%s still reports %s %s%s" % (
            backend.name, name, "running" if after["running"] else "not running",
            (": " + detail) if detail else ""))
    if enabled is not None and after["enabled"] != enabled:
        raise bad("service", "enabled", enabled, "%s still reports %s %s" % (
            backend.name, name, "enabled" if after["enabled"] else "not enabled"))


# -- group -----------------------------------------------------------------------------


def group(name, *, gid=None, system=False, state="present", check=False):
    """Make sure a group exists with the given id, or does not exist.

    :param gid: the group id; an existing group's id is changed (``groupmod``).
    :param system: create a system group (an id from the system range);
        ignored for a group that exists.
    :param state: ``'present'`` or ``'absent'``.
    :return: ``{'changed', 'check', 'name', 'state', 'changes', 'before',
        'after'}``; ``before``/``after`` are ``{'gid': int}`` or ``None``
        (no such group); ``changes`` lists ``'created'``, ``'removed'`` or
        ``'gid'``.  Creating in check mode, ``after['gid']`` is ``gid`` or
        ``None`` (chosen by groupadd).
    """
    _check_name("group", "name", name)
    _check_id("group", "gid", gid)
    _check_choice("group", "state", state, ("present", "absent"))
    toolset = accounts.tools()
    before = accounts.group_state(name)
    if state == "absent":
        if before is not None and not check:
            run(["groupdel" if toolset == "shadow" else "delgroup", name], "group", "name", name)
        after = None if check else accounts.group_state(name)
    elif before is None:
        if not check:
            run(accounts.groupadd_argv(name, gid, system, toolset), "group", "name", name)
        after = {"gid": gid} if check else accounts.group_state(name)
    elif gid is not None and before["gid"] != gid:
        if toolset == "busybox":
            raise bad("group", "gid", gid, "BusyBox has no groupmod: cannot change the id of "
                      "existing group %s (%d)" % (name, before["gid"]))
        if not check:
            run(["groupmod", "-g", str(gid), name], "group", "gid", gid)
        after = {"gid": gid} if check else accounts.group_state(name)
    else:
        after = before
    return _account_result(name, state, check, before, after, {})


def _account_result(name, state, check, before, after, extra_changes):
    if before is None and after is not None:
        changes = ["created"]
    elif before is not None and after is None:
        changes = ["removed"]
    elif before is None:
        changes = []
    else:
        changes = [key for key in sorted(after) if after[key] != before[key]]
        changes += [c for c in extra_changes if c not in changes]
    return {"changed": bool(changes), "check": check, "name": name, "state": state,
            "changes": changes, "before": before, "after": after}


# -- user ------------------------------------------------------------------------------


def _group_names(task, argument, groups, check, warnings):
    names = groups.replace(",", " ").split() if isinstance(groups, str) else list(groups)
    entries = [(g, accounts.group_entry(g)) for g in names]
    unknown = [g for g, entry in entries if entry is None]
    if unknown:
        problem = "no such group%s on this host: %s" % (
            "s" if len(unknown) > 1 else "", ", ".join(str(g) for g in unknown))
        if not check:
            raise bad(task, argument, groups, problem)
        warnings.append("%s=%r: %s (yet: an earlier task must create it)" % (argument, groups, problem))
    return sorted(set(entry.gr_name if entry else str(g) for g, entry in entries))


def _current_hash(name):
    try:
        return accounts.password_hash(name)
    except (IOError, OSError) as exc:
        raise bad("user", "password_hash", "<hidden>", "cannot read %s to compare: %s" % (
            accounts.SHADOW, exc.strerror or exc))


def user(name, *, uid=None, group=None, groups=None, append=True, shell=None, home=None,
         create_home=True, system=False, password_hash=None, state="present", check=False):
    """Make sure a user exists with the given attributes, or does not exist.

    :param uid: the user id.
    :param group: the primary group (a name or an id; it must exist).  By
        default a new user gets the tool's default (on Debian, a group of
        its own name).
    :param groups: supplementary groups (a list, or a string of names
        separated by commas or spaces); every one must exist.  In check
        mode a missing group is reported in ``warnings`` instead (an earlier
        task of the deployment may create it).
    :param append: with ``True`` (the default) the user is added to
        ``groups`` and kept in others; with ``False`` its supplementary
        groups become exactly ``groups``.
    :param shell: the login shell.  :param home: the home directory (an
        existing user's files are not moved).
    :param create_home: make the home directory when creating the user.
    :param system: create a system account (ignored for an existing user).
    :param password_hash: the crypt(3) hash to set (``chpasswd -e``, never
        on a command line); never printed, returned or put in an error.
    :param state: ``'present'`` or ``'absent'`` (``userdel``: the home
        directory is kept).
    :return: ``{'changed', 'check', 'name', 'state', 'changes', 'before',
        'after'}``: ``before``/``after`` are ``{'uid', 'group', 'groups',
        'shell', 'home'}`` or ``None``; ``changes`` lists ``'created'``,
        ``'removed'`` or the attributes that changed (``'password'`` among
        them).  Values a new user gets from the tool are ``None`` in a plan.
    """
    _check_name("user", "name", name)
    _check_id("user", "uid", uid)
    _check_choice("user", "state", state, ("present", "absent"))
    if password_hash is not None and (not isinstance(password_hash, str)
                                      or any(c in password_hash for c in ":\n")):
        raise bad("user", "password_hash", "<hidden>", "must be a crypt(3) hash: a string "
                  "without ':' or newlines")
    toolset = accounts.tools()
    before = accounts.user_state(name)
    if state == "absent":
        if before is not None and not check:
            run(["userdel" if toolset == "shadow" else "deluser", name], "user", "name", name)
        after = None if check else accounts.user_state(name)
        return _account_result(name, state, check, before, after, [])

    # In check mode a missing group is a warning, not an error: a deployment's
    # earlier group task would create it, and its plan creates nothing.
    warnings = []
    primary = None
    if group is not None:
        entry = accounts.group_entry(group)
        if entry is None and not check:
            raise bad("user", "group", group, "no such group on this host")
        if entry is None:
            warnings.append("group=%r: no such group on this host (yet: an earlier task "
                            "must create it)" % (group,))
        primary = entry.gr_name if entry else str(group)
    wanted = None if groups is None else _group_names("user", "groups", groups, check, warnings)
    hash_before = _current_hash(name) if password_hash is not None and before else None

    if before is None:
        plan = {"uid": uid, "group": primary, "groups": wanted or [], "shell": shell, "home": home}
        if not check:
            run(accounts.useradd_argv(name, uid, primary, wanted or [], shell, home,
                                      create_home, system, toolset), "user", "name", name)
            if toolset == "busybox":
                for extra in wanted or []:
                    run(["addgroup", name, extra], "user", "groups", groups)
            _set_password(name, password_hash)
        after = plan if check else accounts.user_state(name)
        return _with_warnings(_account_result(name, state, check, before, after, []), warnings)

    changes = {}
    for attribute, value in (("uid", uid), ("group", primary), ("shell", shell), ("home", home)):
        if value is not None and before[attribute] != value:
            changes[attribute] = value
    new_primary = changes.get("group", before["group"])
    if wanted is not None:
        current = set(before["groups"])
        target = [g for g in wanted if g != new_primary]
        if append and set(target) - current:
            changes["groups"] = (sorted(set(target) - current), True)
        elif not append and set(target) != current:
            changes["groups"] = (target, False)
    new_password = password_hash is not None and hash_before != password_hash

    planned = dict(before)
    planned.update((k, v) for k, v in changes.items() if k != "groups")
    if "groups" in changes:
        names, appended = changes["groups"]
        planned["groups"] = sorted(set(before["groups"]) | set(names)) if appended else names
    if check:
        return _with_warnings(_account_result(name, state, True, before, planned,
                                              ["password"] if new_password else []), warnings)

    if changes:
        _modify(name, before, changes, toolset, groups)
    if new_password:
        _set_password(name, password_hash)
    after = accounts.user_state(name)
    password_changed = new_password and _current_hash(name) != hash_before
    return _account_result(name, state, False, before, after,
                           ["password"] if password_changed else [])


def _with_warnings(result, warnings):
    if warnings:
        result["warnings"] = warnings
    return result


def _modify(name, before, changes, toolset, groups_argument):
    if toolset == "shadow":
        argument = sorted(changes)[0]
        value = changes[argument][0] if argument == "groups" else changes[argument]
        run(accounts.usermod_argv(name, changes), "user", argument, value)
        return
    fixed = sorted(set(changes) - {"groups"})
    if fixed:
        raise bad("user", fixed[0], changes[fixed[0]], "BusyBox has no usermod: cannot "
                  "change %s of existing user %s" % (", ".join(fixed), name))
    names, appended = changes["groups"]
    for extra in sorted(set(names) - set(before["groups"])):
        run(["addgroup", name, extra], "user", "groups", groups_argument)
    if not appended:
        for dropped in sorted(set(before["groups"]) - set(names)):
            run(["delgroup", name, dropped], "user", "groups", groups_argument)


def _set_password(name, password_hash):
    if password_hash is not None:
        run(["chpasswd", "-e"], "user", "password_hash", "<hidden>",
            stdin="%s:%s\n" % (name, password_hash), secrets=(password_hash,))


#: The tasks this package registers, by name.
TASKS = {task.__name__: task for task in (service, user, group)}

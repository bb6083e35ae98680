"""The service managers: is a service running, is it enabled, and how to change either.

One class per manager, each answering ``status(name)`` with
``{'running': bool, 'enabled': bool}`` from the manager's own query
commands (their outputs are read by the ``parse_*`` functions, tested on
recorded outputs) and carrying out one action at a time (``start``,
``stop``, ``restart``, ``reload``, ``enable``, ``disable``).  The
``service`` task in :mod:`chopsticks_system` decides which actions to take.
Runs on the host: standard library only, Python 3.6+.
"""
import os
import plistlib
import re
import shutil
import time

from chopsticks_system._run import bad, run

TASK = "service"

#: What a manager can be asked to do.
ACTIONS = ("start", "stop", "restart", "reload", "enable", "disable")


def _unknown(name, manager, where):
    error = bad(TASK, "name", name, "%s knows no such service (looked in %s)" % (manager, where))
    error.unknown_service = True  # check mode plans past it (an earlier task may install it)
    return error


# -- parsers of each manager's output ---------------------------------------------------


def parse_systemctl_show(text):
    """``systemctl show --property=LoadState,ActiveState,UnitFileState NAME``:
    ``{'exists', 'running', 'enabled', 'unit_file_state'}``.

    ``LoadState=not-found`` is a unit systemd does not know (``is-active``
    would just say ``inactive``).  ``activating``/``reloading`` count as
    running.  ``enabled`` follows ``systemctl is-enabled``'s exit status:
    true for ``enabled``, ``enabled-runtime``, ``static``, ``indirect``,
    ``generated``, ``alias`` and ``transient``.
    """
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    unit_file_state = props.get("UnitFileState", "")
    return {
        "exists": props.get("LoadState") not in (None, "not-found"),
        "running": props.get("ActiveState") in ("active", "activating", "reloading"),
        "enabled": unit_file_state in SYSTEMD_ENABLED_STATES,
        "unit_file_state": unit_file_state,
    }


SYSTEMD_ENABLED_STATES = ("enabled", "enabled-runtime", "static", "indirect", "generated",
                          "alias", "transient")
#: Unit file states ``systemctl enable``/``disable`` cannot change.
SYSTEMD_FIXED_STATES = ("static", "indirect", "generated", "transient", "masked",
                        "masked-runtime", "")


def parse_openrc_status(text, returncode):
    """``rc-service NAME status``: ``' * status: started'`` and exit status 0 is running.

    The other words OpenRC prints are ``stopped`` (3), ``stopping`` (4),
    ``starting`` (8), ``inactive`` (16) and ``crashed`` (32): none is running.
    """
    match = re.search(r"status: (\w+)", text)
    word = match.group(1) if match else None
    return {"running": returncode == 0 and word in ("started", None), "status": word}


def parse_rc_update_show(text):
    """``rc-update show -v``: ``{service: [runlevel, ...]}`` (an empty list: in no runlevel)."""
    runlevels = {}
    for line in text.splitlines():
        name, sep, levels = line.partition("|")
        if sep and name.strip():
            runlevels[name.strip()] = levels.split()
    return runlevels


def parse_sv_status(text):
    """``sv status PATH``: ``run``, ``down``, ``finish``, or ``None`` when runsv
    does not supervise it (yet).  ``'run: x: (pid 12) 3s; run: log: ...'``: the
    first word is the service's own state, later ones its log's."""
    first = text.strip().split(":", 1)[0]
    return first if first in ("run", "down", "finish") else None


def parse_launchctl_list(text):
    """``launchctl list``: ``{label: {'pid': int or None, 'status': int}}``.

    Columns are ``PID Status Label``, tab-separated; PID is ``-`` for a
    loaded job that is not running.
    """
    jobs = {}
    for line in text.splitlines():
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) != 3 or fields[0] == "PID":
            continue
        pid, status, label = fields
        jobs[label] = {"pid": int(pid) if pid.isdigit() else None,
                       "status": int(status) if status.lstrip("-").isdigit() else None}
    return jobs


def parse_launchctl_print_disabled(text):
    """``launchctl print-disabled system``: ``{label: disabled}``.

    macOS up to 12 prints ``"label" => true`` (true: disabled); macOS 13 and
    later print ``"label" => disabled`` / ``=> enabled``.
    """
    disabled = {}
    for match in re.finditer(r'"([^"]+)"\s*=>\s*(true|false|disabled|enabled)', text):
        disabled[match.group(1)] = match.group(2) in ("true", "disabled")
    return disabled


# -- the managers ---------------------------------------------------------------------


class Manager(object):
    """One service manager.  Subclasses set ``name`` and implement the three methods."""

    name = None

    def status(self, service):
        """``{'running': bool, 'enabled': bool, ...}`` (other keys are the
        manager's own, for ``check_plan``); a TaskError for an unknown service."""
        raise NotImplementedError

    def act(self, service, action):
        """Carry out one of ACTIONS."""
        raise NotImplementedError

    def check_plan(self, service, status, actions):
        """Refuse, before anything runs, a plan this manager cannot carry out
        (``status`` is what :meth:`status` returned)."""

    def __repr__(self):
        return "<%s service manager>" % self.name


class Systemd(Manager):
    name = "systemd"
    PROPERTIES = "LoadState,ActiveState,UnitFileState"

    def _show(self, service):
        out = run(["systemctl", "show", "--property=" + self.PROPERTIES, service],
                  TASK, "name", service).out
        state = parse_systemctl_show(out)
        if not state["exists"]:
            raise _unknown(service, self.name, "systemctl show: LoadState=not-found")
        return state

    def status(self, service):
        return self._show(service)

    def check_plan(self, service, status, actions):
        unit_file_state = status["unit_file_state"]
        if ("enable" in actions or "disable" in actions) and unit_file_state in SYSTEMD_FIXED_STATES:
            raise bad(TASK, "enabled", "enable" in actions,
                      "systemd unit %s is %s: systemctl enable/disable cannot change that%s" % (
                          service, unit_file_state or "without a unit file",
                          " (unmask it first)" if unit_file_state.startswith("masked") else
                          " (mask it to keep it from starting)"))

    def act(self, service, action):
        run(["systemctl", action, service], TASK, "name", service)


class OpenRC(Manager):
    name = "openrc"

    def __init__(self, init_dir="/etc/init.d"):
        self.init_dir = init_dir

    def _runlevels(self, service):
        return parse_rc_update_show(run(["rc-update", "show", "-v"], TASK, "name", service).out
                                    ).get(service, [])

    def _status_word(self, service):
        proc = run(["rc-service", service, "status"], TASK, "name", service, ok_codes=None)
        return parse_openrc_status(proc.out + proc.err, proc.returncode)

    def status(self, service):
        if "/" in service or not os.path.isfile(os.path.join(self.init_dir, service)):
            raise _unknown(service, self.name, self.init_dir)
        return {"running": self._status_word(service)["running"],
                "enabled": bool(self._runlevels(service))}

    def act(self, service, action):
        if action == "start" and self._status_word(service)["status"] == "crashed":
            # OpenRC still counts a crashed service as started: start would do nothing
            action = "restart"
        if action == "enable":
            run(["rc-update", "add", service, "default"], TASK, "enabled", True)
        elif action == "disable":
            for level in self._runlevels(service):
                run(["rc-update", "del", service, level], TASK, "enabled", False)
        else:
            run(["rc-service", service, action], TASK, "name", service)


class SysVinit(Manager):
    """Init scripts in /etc/init.d, run through ``service`` where it exists;
    enabled means an ``S`` link in one of runlevels 2 to 5, made with
    ``update-rc.d`` (Debian) or ``chkconfig`` (Red Hat)."""

    name = "sysvinit"
    RUNLEVELS = "2345"

    def __init__(self, init_dir="/etc/init.d", rc_dirs=("/etc", "/etc/rc.d")):
        self.init_dir = init_dir
        self.rc_dirs = rc_dirs

    def _script(self, service):
        path = os.path.join(self.init_dir, service)
        if "/" in service or not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise _unknown(service, self.name, self.init_dir)
        return path

    def _argv(self, service, action):
        if shutil.which("service"):
            return ["service", service, action]
        return [self._script(service), action]

    def links(self, service):
        """``{runlevel: 'S' or 'K'}`` from the rc?.d directories."""
        links = {}
        pattern = re.compile(r"^([SK])\d\d%s$" % re.escape(service))
        for root in self.rc_dirs:
            for level in "0123456S":
                directory = os.path.join(root, "rc%s.d" % level)
                try:
                    names = os.listdir(directory)
                except OSError:
                    continue
                for entry in names:
                    match = pattern.match(entry)
                    if match:
                        links[level] = match.group(1)
        return links

    def status(self, service):
        self._script(service)
        proc = run(self._argv(service, "status"), TASK, "name", service, ok_codes=None)
        # LSB: 0 running; 1 dead with a pid file; 2 dead with a lock file; 3 not running
        if proc.returncode not in (0, 1, 2, 3):
            raise bad(TASK, "name", service, "`%s` exited with status %d, which LSB does not "
                      "define for status: the init script has no usable status action%s" % (
                          " ".join(proc.argv), proc.returncode,
                          (":\n" + (proc.err.strip() or proc.out.strip())) if (proc.err + proc.out).strip() else ""))
        links = self.links(service)
        enabled = any(links.get(level) == "S" for level in self.RUNLEVELS)
        return {"running": proc.returncode == 0, "enabled": enabled}

    def act(self, service, action):
        if action not in ("enable", "disable"):
            run(self._argv(service, action), TASK, "name", service)
            return
        value = action == "enable"
        if shutil.which("update-rc.d"):
            if action == "enable" and not self.links(service):
                run(["update-rc.d", service, "defaults"], TASK, "enabled", value)
            if action == "disable" or not any(self.links(service).get(l) == "S" for l in self.RUNLEVELS):
                run(["update-rc.d", service, action], TASK, "enabled", value)
        elif shutil.which("chkconfig"):
            if action == "enable":
                run(["chkconfig", "--add", service], TASK, "enabled", value)
            run(["chkconfig", service, "on" if value else "off"], TASK, "enabled", value)
        else:
            raise bad(TASK, "enabled", value, "neither update-rc.d nor chkconfig is installed")


class Runit(Manager):
    """Service definitions in ``/etc/sv/NAME``; enabled means a symlink to it in
    the service directory runsvdir watches (``$SVDIR``, else the first of
    /etc/service, /var/service, /service that exists); controlled with ``sv``.

    runsvdir looks at its directory every 5 seconds: enabling waits up to
    ``supervise_timeout`` seconds for runsv to take the new service.
    """

    name = "runit"
    RESTART_PAUSE = 3.0
    SERVICE_DIRS = ("/etc/service", "/var/service", "/service", "/etc/runit/runsvdir/default")

    def __init__(self, definition_dirs=("/etc/sv", "/etc/runit/sv"), service_dir=None,
                 supervise_timeout=10.0):
        self.definition_dirs = definition_dirs
        self._service_dir = service_dir
        self.supervise_timeout = supervise_timeout

    @property
    def service_dir(self):
        if self._service_dir:
            return self._service_dir
        if os.environ.get("SVDIR"):
            return os.environ["SVDIR"]
        for candidate in self.SERVICE_DIRS:
            if os.path.isdir(candidate):
                return candidate
        return self.SERVICE_DIRS[0]

    def _definition(self, service):
        for directory in self.definition_dirs:
            path = os.path.join(directory, service)
            if os.path.isfile(os.path.join(path, "run")):
                return path
        return None

    def _linked(self, service):
        return os.path.join(self.service_dir, service)

    def status(self, service):
        linked = self._linked(service)
        if "/" in service or not (self._definition(service) or os.path.lexists(linked)):
            raise _unknown(service, self.name, ", ".join(tuple(self.definition_dirs) + (self.service_dir,)))
        if not os.path.lexists(linked):
            return {"running": False, "enabled": False}
        # runsv waits a second before starting again a service that ran for
        # less than one (a quick restart can land there): "down ..., want up"
        # lasts that second, so look again for up to RESTART_PAUSE seconds.
        deadline = time.time() + self.RESTART_PAUSE
        while True:
            proc = run(["sv", "status", linked], TASK, "name", service, ok_codes=None)
            word = parse_sv_status(proc.out)
            if word != "down" or "want up" not in proc.out or time.time() > deadline:
                break
            time.sleep(0.1)
        return {"running": word == "run", "enabled": True, "detail": (proc.out + proc.err).strip()}

    def check_plan(self, service, status, actions):
        will_be_enabled = "enable" in actions or (status["enabled"] and "disable" not in actions)
        if not will_be_enabled and set(actions) & {"start", "restart", "reload"}:
            raise bad(TASK, "state", "started", "runit runs only the services linked into %s "
                      "and %s is not: pass enabled=True" % (self.service_dir, service))
        linked = self._linked(service)
        if "disable" in actions and not os.path.islink(linked):
            raise bad(TASK, "enabled", False, "%s is a directory, not a link to a service "
                      "definition: not removing it" % linked)
        if "enable" in actions and not self._definition(service):
            raise _unknown(service, self.name, ", ".join(self.definition_dirs))

    def act(self, service, action):
        linked = self._linked(service)
        if action == "enable":
            os.symlink(self._definition(service), linked)
            self._wait_supervised(service, linked)
        elif action == "disable":
            # Stop it before runsvdir lets go of it: runsv exits on its own
            # only once the service is down.
            target = os.path.realpath(linked)
            os.unlink(linked)
            run(["sv", "-w", "7", "force-stop", target], TASK, "enabled", False)
            run(["sv", "exit", target], TASK, "enabled", False, ok_codes=None)
        else:
            command = {"reload": "hup"}.get(action, action)
            run(["sv", "-w", "7", command, linked], TASK, "name", service)

    def _wait_supervised(self, service, linked):
        ok = os.path.join(linked, "supervise", "ok")
        deadline = time.time() + self.supervise_timeout
        while time.time() < deadline:
            if os.path.exists(ok) and run(["sv", "status", linked], TASK, "enabled", True,
                                          ok_codes=None).returncode == 0:
                return
            time.sleep(0.2)
        raise bad(TASK, "enabled", True, "linked %s into %s but no runsv took it within %gs: "
                  "is runsvdir running on that directory?" % (
                      service, self.service_dir, self.supervise_timeout))


class Launchd(Manager):
    """Jobs by label, their property lists in the LaunchDaemons/LaunchAgents
    directories; enabled means not disabled in launchd's override database
    (``load -w`` / ``unload -w``).  Stopping unloads the job (without ``-w``)
    so that a ``KeepAlive`` job stays down; launchd has no reload."""

    name = "launchd"
    PLIST_DIRS = ("/Library/LaunchDaemons", "/Library/LaunchAgents",
                  "/System/Library/LaunchDaemons", "/System/Library/LaunchAgents")

    def __init__(self, plist_dirs=PLIST_DIRS):
        self.plist_dirs = plist_dirs

    def _plist(self, service):
        for directory in self.plist_dirs:
            path = os.path.join(directory, service + ".plist")
            if os.path.isfile(path):
                return path
        return None

    def status(self, service):
        jobs = parse_launchctl_list(run(["launchctl", "list"], TASK, "name", service).out)
        plist = self._plist(service)
        if service not in jobs and plist is None:
            raise _unknown(service, self.name, "launchctl list, " + ", ".join(self.plist_dirs))
        overrides = parse_launchctl_print_disabled(
            run(["launchctl", "print-disabled", "system"], TASK, "name", service).out)
        if service in overrides:
            enabled = not overrides[service]
        elif plist:
            with open(plist, "rb") as f:
                enabled = not plistlib.load(f).get("Disabled", False)
        else:
            enabled = True
        running = service in jobs and jobs[service]["pid"] is not None
        return {"running": running, "enabled": enabled, "loaded": service in jobs}

    def check_plan(self, service, status, actions):
        if "reload" in actions:
            raise bad(TASK, "state", "reloaded", "launchd has no reload: use state='restarted'")
        if set(actions) & {"enable", "disable", "start"} and not self._plist(service):
            raise _unknown(service, self.name, ", ".join(self.plist_dirs) + " (a property list)")

    def act(self, service, action):
        plist = self._plist(service)
        if action in ("enable", "disable"):
            run(["launchctl", "load" if action == "enable" else "unload", "-w", plist],
                TASK, "enabled", action == "enable")
        elif action == "start":
            if not self.status(service)["loaded"]:
                run(["launchctl", "load", plist], TASK, "name", service)
            if not self.status(service)["running"]:
                run(["launchctl", "start", service], TASK, "name", service)
        elif action == "stop":
            if plist:
                run(["launchctl", "unload", plist], TASK, "name", service)
            else:
                run(["launchctl", "stop", service], TASK, "name", service)
        elif action == "restart":
            run(["launchctl", "stop", service], TASK, "name", service)
            run(["launchctl", "start", service], TASK, "name", service)
        else:
            raise bad(TASK, "state", "reloaded", "launchd has no reload: use state='restarted'")


MANAGERS = {cls.name: cls for cls in (Systemd, OpenRC, Runit, SysVinit, Launchd)}


def get_manager(manager):
    """The Manager for a name, an instance as given, or the host's own for ``None``."""
    if isinstance(manager, Manager):
        return manager
    if manager is None:
        from chopsticks_facts import service_manager
        detected = service_manager()
        if detected is None:
            if os.path.isdir("/etc/init.d") and shutil.which("service"):
                detected = "sysvinit"
            else:
                raise bad(TASK, "manager", None, "cannot tell which service manager this host runs "
                          "(the service_manager fact says none): name one of %s" % ", ".join(sorted(MANAGERS)))
        manager = detected
    if manager not in MANAGERS:
        raise bad(TASK, "manager", manager, "unknown service manager: chopsticks-system knows %s"
                  % ", ".join(sorted(MANAGERS)))
    return MANAGERS[manager]()

"""The ``chopsticks`` command: list plugins, gather facts, run tasks.

Exit codes, for scripts: 0 everything succeeded; 1 a host (or a fact or
task on it) failed; 2 the command line was wrong (unknown option, fact, task
or tunnel scheme).
"""
from __future__ import annotations

import difflib
import inspect
import json
import sys
import warnings
from typing import Any, Callable, Dict, List, Sequence, Tuple

import click

from chopsticks import cli_ops, display
from chopsticks import hosts as host_strings
from chopsticks import plugins
from chopsticks.errors import ChopsticksError, RemoteException
from chopsticks.gather import gather
from chopsticks.group import ErrorResult

EXIT_OK, EXIT_HOST_FAILED, EXIT_USAGE = 0, 1, 2


def _tunnels(hosts: Sequence[str]) -> Dict[str, Any]:
    tunnels = {}
    for host in hosts:
        if not isinstance(host, str):  # resolved already (cli_ops.resolve_hosts)
            tunnels[host.host] = host
            continue
        try:
            tunnels[host] = host_strings.tunnel_from_url(host)
        except (ValueError, TypeError) as exc:
            raise click.UsageError(f"bad host {host!r}: {exc}") from None
    return tunnels


def call_on_hosts(hosts: Sequence[str], fn: Callable[..., Any], *args: Any,
                  timeout: float | None = None, **kwargs: Any) -> Dict[str, Tuple[bool, Any]]:
    """``fn(*args, **kwargs)`` on every host in parallel, through a
    :class:`~chopsticks.group.Group`: ``{host string: (ok, result or the
    host's ErrorResult)}``.

    The one place the CLI touches tunnels; they are closed after the call.
    """
    tunnels = _tunnels(hosts)
    group = cli_ops.host_group(list(tunnels.values()), words=hosts, progress=False)
    try:
        results = group.call(fn, *args, timeout=timeout, **kwargs)
    finally:
        group.close()
    outcomes = {}
    for host, tunnel in tunnels.items():
        value = results[tunnel.host]
        outcomes[host] = (not isinstance(value, ErrorResult), value)
    return outcomes


def _error_text(failure: ErrorResult) -> str:
    """``'ConnectError: could not connect: ...'``: the report names the host,
    so the message does not again (ErrorResult.msg has no ``[host]``)."""
    exc = failure.exception
    if isinstance(exc, RemoteException) or not isinstance(exc, ChopsticksError):
        return failure.msg  # already 'TypeName: message'
    return f"{type(exc).__name__}: {failure.msg}"


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, complex):
        return [value.real, value.imag]
    return str(value)  # datetimes, Decimal, UUID, PurePath


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, default=_json_default, **kwargs)


def _short(value: Any) -> str:
    if isinstance(value, str):
        return value
    return _dumps(value, sort_keys=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", plugins.PluginWarning)
            warnings.showwarning = _show_warning
            return super().invoke(ctx)


def _show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    click.echo(f"Warning: {message}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chopsticks", prog_name="chopsticks")
def main() -> None:
    """Call Python functions on hosts: gather facts, run tasks, list plugins.

    A HOST is an ssh_config alias or [user@]host[:port], or a tunnel URL:
    local, local://, sudo://USER, docker://NAME, or a scheme a plugin adds
    (see list-plugins).  ?via=HOST opens it from another host:
    sudo://root?via=web1.
    """


@main.command("list-plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def list_plugins(as_json: bool) -> None:
    """Show installed plugins: what each registers, and its status.

    A broken plugin is listed with its error (and the others still work);
    CHOPSTICKS_PLUGINS=name,... or CHOPSTICKS_DISABLE_PLUGIN_AUTOLOAD=1
    choose which plugins load.
    """
    infos = plugins.get_plugin_manager().plugins()
    if as_json:
        click.echo(_dumps([info.as_dict() for info in infos], indent=2))
        return
    for info in infos:
        dist = f"{info.distribution} {info.version or ''}".strip() if info.distribution else "(registered in code)"
        status = info.status + (f": {info.message}" if info.message else "")
        click.echo(f"{info.name}  {dist}  {status}")
        for kind in ("facts", "tasks", "tunnels"):
            names = getattr(info, kind)
            if names:
                suffix = "://" if kind == "tunnels" else ""
                click.echo(f"    {kind}: " + ", ".join(n + suffix for n in names))


def _fact_refs(names: Sequence[str]) -> Dict[str, Tuple[str, float | None]]:
    """{fact name: ('module:qualname', timeout or None)} for the facts asked for (default all)."""
    pm = plugins.get_plugin_manager()
    registry = pm.facts
    if not registry:
        raise click.UsageError("no facts are registered: pip install chopsticks-facts "
                               "(see `chopsticks list-plugins`)")
    refs = {}
    for name in names or sorted(registry):
        try:
            func = pm.lookup("fact", name)
        except plugins.UnknownNameError as exc:
            raise click.UsageError(str(exc)) from None
        timeout = registry[name].metadata.get("timeout")
        refs[name] = (f"{func.__module__}:{func.__qualname__}", timeout)
    return refs


@main.command(cls=cli_ops.HostCommand)
@cli_ops.host_options
@click.argument("hosts", nargs=-1, required=True, metavar="HOST...")
@click.option("--fact", "-f", "fact_names", multiple=True, metavar="NAME",
              help="A fact to gather (repeatable); default: all registered facts.")
@click.option("--timeout", "-t", type=float, default=5.0, show_default=True,
              help="Seconds each fact may take on the host.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def facts(hosts: Sequence[str], fact_names: Sequence[str], timeout: float, as_json: bool) -> None:
    """Gather facts from hosts in parallel, all facts of a host in one round trip.

    Each fact has its own timeout on the host, so a slow one (a hung NFS
    mount) costs only itself.
    """
    refs = _fact_refs(fact_names)
    hosts = cli_ops.resolve_hosts(hosts)
    timeouts = {ref: t if t is not None else timeout for ref, t in refs.values()}
    # One round trip a host: chopsticks.gather runs every fact there, each
    # with its own timeout.
    outcomes = call_on_hosts(hosts, gather, [ref for ref, _ in refs.values()], timeouts,
                             timeout=max(timeouts.values()) + 60)
    report: Dict[str, Any] = {}
    failed = False
    for host, (ok, value) in outcomes.items():
        if ok:
            report[host] = {name: value[ref] for name, (ref, _) in refs.items()}
            failed |= any(_is_error(v) for v in report[host].values())
        else:
            report[host] = {"error": _error_text(value)}
            failed = True
    if as_json:
        click.echo(_dumps(report, indent=2, sort_keys=True))
    else:
        for host, values in report.items():
            click.echo(host)
            if "error" in values and len(values) == 1:
                click.echo(f"    FAILED: {display.printable_block(values['error'], ' ' * 8)}")
                continue
            width = max(len(name) for name in values)
            for name, value in values.items():
                if _is_error(value):
                    value = f"error: {value['error']}"
                for line in display.value_lines(name, value, "    ", width):
                    click.echo(line)
    sys.exit(EXIT_HOST_FAILED if failed else EXIT_OK)


def _is_error(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"error"}


def _split_run_args(words: Sequence[str]) -> Tuple[List[str], str, List[str]]:
    """HOST... TASK [ARGS]: the first word (after a host) naming a registered task ends the hosts."""
    pm = plugins.get_plugin_manager()
    registry = pm.tasks
    for i, word in enumerate(words):
        if i > 0 and word in registry:
            return list(words[:i]), word, list(words[i + 1:])
    if not registry:
        raise click.UsageError("no tasks are registered: pip install chopsticks-pkg, or another "
                               "plugin with tasks (see `chopsticks list-plugins`)")
    hint = ""
    for word in words[1:]:
        close = difflib.get_close_matches(word, list(registry), n=1)
        if close:
            hint = f" Did you mean {close[0]!r} instead of {word!r}?"
            break
    raise click.UsageError(f"no task in {' '.join(words)!r}: HOST... must be followed by a task, "
                           f"one of: {', '.join(sorted(registry))}.{hint}")


def _task_arguments(task: Callable[..., Any], args: Sequence[str]) -> Tuple[List[Any], Dict[str, Any]]:
    """ARGS: ``key=value`` where key is a parameter of the task, else positional.

    Values are JSON when they parse (``max_age=3600`` is an int), text
    otherwise (``hello=2.10-3`` stays one positional string: a pin).
    """
    params = inspect.signature(task).parameters
    positional: List[Any] = []
    keywords: Dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in params and key != "check":
            keywords[key] = host_strings.parse_value(value)
        else:
            positional.append(host_strings.parse_value(arg))
    return positional, keywords


@main.command(cls=cli_ops.HostCommand, context_settings={"ignore_unknown_options": False})
@cli_ops.host_options
@click.argument("words", nargs=-1, required=True, metavar="HOST... TASK [ARGS]...")
@click.option("--check", is_flag=True, help="Report what would change; change nothing.")
@click.option("--diff", "show_diff", is_flag=True,
              help="Print the changes a task reports in its result's 'diff' (file contents).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def run(words: Sequence[str], check: bool, as_json: bool, show_diff: bool = False) -> None:
    """Run a task on hosts in parallel and report changed / ok / failed per host.

    ARGS are the task's arguments: NAME=VALUE for a parameter of the task,
    anything else positional; values are JSON when they parse.  Examples:

        chopsticks run web1 web2 install nginx
        chopsticks run sudo://root update_cache max_age=3600 --check
        chopsticks run web1 file /etc/motd content=hello --check --diff
    """
    hosts, task_name, args = _split_run_args(words)
    hosts = cli_ops.resolve_hosts(hosts)
    task = plugins.get_plugin_manager().lookup("task", task_name)
    positional, keywords = _task_arguments(task, args)
    outcomes = call_on_hosts(hosts, task, *positional, check=check, **keywords)
    report: Dict[str, Any] = {}
    failed = False
    for host, (ok, value) in outcomes.items():
        if ok and isinstance(value, dict) and "changed" in value:
            report[host] = value
        else:
            failed = True
            report[host] = {"error": _error_text(value) if not ok else
                            f"task {task_name!r} returned {value!r}, not a dict with 'changed'"}
    if as_json:
        click.echo(_dumps(report, indent=2, sort_keys=True))
    else:
        width = max(len(host) for host in report)
        for host, result in report.items():
            if "error" in result and "changed" not in result:
                error = display.printable_block(result["error"], " " * (width + 4))
                click.echo(f"{host.ljust(width)}  failed   {error}")
                continue
            state = ("would change" if check else "changed") if result["changed"] else "ok"
            details = "  ".join(f"{k}: {_summary(v)}" for k, v in result.items()
                                if k not in ("changed", "check", "diff") and v not in (None, "", [], {}))
            click.echo(f"{host.ljust(width)}  {state.ljust(7)}  {display.printable(details)}".rstrip())
            if show_diff and isinstance(result.get("diff"), str) and result["diff"]:
                for text in result["diff"].rstrip("\n").split("\n"):
                    click.echo("    " + display.printable(text))
    sys.exit(EXIT_HOST_FAILED if failed else EXIT_OK)


def _summary(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    return _short(value)


@main.command("exec", cls=cli_ops.HostCommand)
@cli_ops.host_options
@click.argument("words", nargs=-1, required=True, metavar="HOST... -- COMMAND")
@click.option("--timeout", "-t", type=float, default=None, help="Seconds the command may run.")
@click.option("--stream", is_flag=True, help="Show output lines as they come.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def exec_(words: Sequence[str], timeout: float | None, stream: bool, as_json: bool) -> None:
    """Run a shell command on hosts in parallel; output grouped per host.

    \b
        chopsticks exec web1 web2 -- uptime
        chopsticks exec -i hosts.ini 'web:!web3' --become -K -- apt-get update
    """
    cli_ops.exec_command(words, timeout, as_json, stream)


@main.command("list-hosts", cls=cli_ops.HostCommand)
@cli_ops.host_options
@click.argument("patterns", nargs=-1, metavar="PATTERN...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def list_hosts(patterns: Sequence[str], as_json: bool) -> None:
    """Show the hosts a pattern selects (default: all), with each host's tunnel."""
    cli_ops.list_hosts_command(patterns, as_json)


if __name__ == "__main__":  # python -m chopsticks.cli
    main()

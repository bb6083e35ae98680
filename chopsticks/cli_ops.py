"""The everyday commands of the ``chopsticks`` CLI: ``exec`` and
``list-hosts``, and the host options every command that reaches hosts takes
(``-i/--inventory``, ``--become[=USER]``, ``-K/--ask-become-pass``).

``chopsticks.cli`` registers them; the fan-out goes through
:class:`chopsticks.Group`.
"""
from __future__ import annotations

import getpass
import json
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import click

from chopsticks.display import printable_block, printable_lines

EXIT_OK, EXIT_HOST_FAILED, EXIT_USAGE = 0, 1, 2


class HostCommand(click.Command):
    """A command taking HOST words: ``--become`` alone means ``--become=root``
    (click would take the next word, a host, as the user); for ``exec``,
    the words after ``--`` are the command."""

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        args = list(args)
        if '--' in args:
            at = args.index('--')
            ctx.meta['chopsticks.command_words'] = args[at + 1:]
            args = args[:at]
        args = ['--become=root' if a == '--become' else a for a in args]
        return super().parse_args(ctx, args)


def host_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """-i/--inventory, --become[=USER], -K: kept in ``ctx.meta`` for :func:`resolve_hosts`."""
    def keep(name):
        def callback(ctx, param, value):
            ctx.meta['chopsticks.' + name] = value
            return value
        return callback

    options = [
        click.option('-i', '--inventory', metavar='PATH', envvar='CHOPSTICKS_INVENTORY',
                     expose_value=False, callback=keep('inventory'),
                     help='An inventory (chopsticks TOML, Ansible INI or YAML): HOST words '
                          'are then patterns (web:&prod:!web3).  Default: $CHOPSTICKS_INVENTORY.'),
        click.option('--become', metavar='[=USER]', expose_value=False, callback=keep('become'),
                     help='Run as USER (default root) through sudo on every host.'),
        click.option('-K', '--ask-become-pass', is_flag=True, expose_value=False,
                     callback=keep('ask_pass'),
                     help="Ask once for sudo's password, used for every host."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_inventory(ctx: Optional[click.Context] = None):
    from chopsticks import inventory
    ctx = ctx or click.get_current_context()
    path = ctx.meta.get('chopsticks.inventory')
    if not path:
        return None
    try:
        return inventory.load(path)
    except (OSError, inventory.InventoryError) as exc:
        raise click.UsageError(str(exc)) from None


def _looks_like_host_string(word: str) -> bool:
    return '://' in word or '@' in word or word in ('local', 'localhost')


def resolve_hosts(words: Sequence[str]) -> List[Any]:
    """What HOST words name: with ``-i``, the tunnels of inventory patterns;
    else the host strings themselves (a report keys them as typed).  With
    ``--become``, each is wrapped in a sudo tunnel of the same name."""
    from chopsticks import inventory, plugins
    ctx = click.get_current_context()
    inv = load_inventory(ctx)
    hosts: List[Any] = []
    seen = set()

    def add(host):
        name = host if isinstance(host, str) else host.host
        if name not in seen:
            seen.add(name)
            hosts.append(host)

    for word in words:
        if inv is not None and not (_looks_like_host_string(word) and not inv.has_host(word)):
            try:
                selected = inv.select(word)
            except inventory.InventoryError as exc:
                raise click.UsageError(str(exc)) from None
            if not len(selected):
                raise click.UsageError(f'{word!r} selects no host of {inv.path}')
            for tunnel in selected:
                add(tunnel)
            continue
        try:
            plugins.tunnel_from_url(word)  # a bad host string is a usage error, now
        except (ValueError, TypeError) as exc:
            raise click.UsageError(f'bad host {word!r}: {exc}') from None
        add(word)
    return _with_become(hosts, ctx)


def _with_become(hosts: List[Any], ctx: click.Context) -> List[Any]:
    user = ctx.meta.get('chopsticks.become')
    password = None
    if ctx.meta.get('chopsticks.ask_pass'):
        password = getpass.getpass('BECOME password: ')
        user = user or 'root'
    if not user:
        return hosts
    from chopsticks import plugins
    from chopsticks.become import BecomeTunnel, become
    tunnels = []
    for host in hosts:
        tunnel = plugins.tunnel_from_url(host) if isinstance(host, str) else host
        if isinstance(tunnel, BecomeTunnel):
            # A host that becomes someone already (its inventory's
            # become_user, a sudo:// string) stays as it is, as in Ansible,
            # where a host's become_user wins over --become-user: wrapped, it
            # ran sudo twice, the second as the first's user, and failed.
            if password is not None:
                tunnel.offer_password(password)
            tunnels.append(host if isinstance(host, str) and password is None else tunnel)
            continue
        tunnels.append(become(tunnel, user, password=password,
                              name=host if isinstance(host, str) else None))
    return tunnels


def host_group(hosts: Sequence[Any], words: Optional[Sequence[Any]] = None,
               **kwargs: Any) -> Any:
    """The :class:`~chopsticks.Group` of ``hosts`` (what :func:`resolve_hosts`
    gave, or their tunnels), for every command that reaches hosts.

    Two HOST words naming one host (``local localhost``, ``web1
    ssh://web1``) are a usage error: results are keyed by host name.
    ``words`` are the hosts as typed, for that message (default ``hosts``).
    """
    from chopsticks.group import Group
    try:
        return Group(list(hosts), **kwargs)
    except ValueError as exc:
        typed = ' '.join(h if isinstance(h, str) else h.host for h in (words or hosts))
        raise click.UsageError(f'{exc} (hosts: {typed})') from None


# --- exec ---------------------------------------------------------------------------------

def command_of(ctx: click.Context, words: Sequence[str]) -> tuple:
    """(host words, command): the command is what follows ``--`` (joined with
    spaces and run by the host's shell, as ssh does), else the last word."""
    after = ctx.meta.get('chopsticks.command_words')
    if after is None:
        if len(words) < 2:
            raise click.UsageError('usage: chopsticks exec HOST... -- COMMAND')
        return list(words[:-1]), words[-1]
    if not after:
        raise click.UsageError('no command after --')
    if not words:
        raise click.UsageError('no HOST before --')
    return list(words), ' '.join(after)


def exec_command(words: Sequence[str], timeout: Optional[float], as_json: bool,
                 stream: bool) -> None:
    from chopsticks.group import ErrorResult
    ctx = click.get_current_context()
    host_words, command = command_of(ctx, words)
    group = host_group(resolve_hosts(host_words))
    try:
        results = group.run(command, check=False, timeout=timeout, stream=stream and not as_json)
    finally:
        group.close()
    failed = [host for host, r in results.items() if isinstance(r, ErrorResult) or not r.ok]
    if as_json:
        report = {host: ({'host': host, 'ok': False, 'error': r.msg}
                         if isinstance(r, ErrorResult) else r.as_dict())
                  for host, r in results.items()}
        click.echo(json.dumps(report, indent=2))
    else:
        for host, result in results.items():
            _show_host(host, result)
        ok = len(results) - len(failed)
        summary = f'{ok} ok, {len(failed)} failed'
        if failed:
            summary += ': ' + ', '.join(failed)
        click.echo(summary)
    sys.exit(EXIT_HOST_FAILED if failed else EXIT_OK)


def _show_host(host: str, result: Any) -> None:
    from chopsticks.group import ErrorResult
    if isinstance(result, ErrorResult):
        click.echo(f'[{host}] FAILED: {printable_block(result.msg, "    ")}')
        return
    click.echo(f'[{host}] {"ok" if result.ok else "FAILED"} ({result.status()})')
    # The host's text is escaped line by line: a \r or an escape sequence in
    # it cannot repaint another host's lines.
    for text, prefix in ((result.stdout, '    '), (result.stderr, '  ! ')):  # stderr marked
        if text:
            click.echo(printable_lines(text[:-1] if text.endswith('\n') else text, prefix))


# --- list-hosts ---------------------------------------------------------------------------

def list_hosts_command(patterns: Sequence[str], as_json: bool) -> None:
    ctx = click.get_current_context()
    inv = load_inventory(ctx)
    tunnels = resolve_hosts(patterns or (['all'] if inv is not None else []))
    if not tunnels:
        raise click.UsageError('name a PATTERN, or an inventory with -i')
    from chopsticks import plugins
    tunnels = [plugins.tunnel_from_url(t) if isinstance(t, str) else t for t in tunnels]
    if as_json:
        report = {t.host: {'tunnel': repr(t),
                           'vars': _masked(inv.vars(t.host)) if inv is not None
                           and inv.has_host(t.host) else {}} for t in tunnels}
        click.echo(json.dumps(report, indent=2, default=str))
        return
    width = max(len(t.host) for t in tunnels)
    for tunnel in tunnels:
        click.echo(f'{tunnel.host.ljust(width)}  {tunnel!r}')
    click.echo(f'{len(tunnels)} host{"s" if len(tunnels) != 1 else ""}')


def _masked(variables: Dict[str, Any]) -> Dict[str, Any]:
    """Passwords (become_password, ansible_become_pass...) shown as stars."""
    return {k: ('********' if 'pass' in k.lower() and v else v) for k, v in variables.items()}

"""Host strings: ``'web1'``, ``'user@web1:2222'``, ``'local'``, ``'sudo://root?via=ssh://web1'``.

:func:`tunnel_from_url` turns one into a tunnel, through the tunnel schemes
plugins registered (:mod:`chopsticks.plugins`); :class:`CoreTunnels` is the
built-in plugin that registers chopsticks' own schemes.  The command line
and :class:`chopsticks.group.Group` take host strings through here.

Controller only (it needs pluggy): a relay host takes its host strings as
SSH hosts (see chopsticks.group).
"""
from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote

from chopsticks import tunnel
from chopsticks.hookspecs import hookimpl
from chopsticks.plugins import UnknownNameError, get_plugin_manager

__all__ = ["tunnel_from_url", "parse_value", "CoreTunnels"]

# Host strings nested through ``via`` (``sudo://a?via=sudo://b?via=...``)
# deeper than this are refused: a relay chain cannot be longer
# (chopsticks.relay's max_depth defaults to far less), and a string that
# names itself must not recurse without end.
MAX_VIA_NESTING = 16


def parse_value(text: str) -> Any:
    """A command-line or query-string value: JSON if it parses, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def tunnel_from_url(url: str, **kwargs: Any) -> Any:
    """The tunnel a host string names; ``kwargs`` (such as ``via=relay``) go
    to the tunnel's constructor too.

    * ``scheme://address?option=value&...`` calls the factory registered for
      ``scheme`` (see :func:`chopsticks.hookspecs.chopsticks_register_tunnels`)
      as ``factory(address, option=value, ...)``; option values are parsed as
      JSON when they are valid JSON.
    * ``local`` is ``local://``; any other string without ``://`` is an SSH
      host or ``~/.ssh/config`` alias (``ssh://`` + the string).
    * ``via`` (an option, or a keyword argument) may itself be a host
      string: ``sudo://root?via=ssh://web1`` opens ``sudo`` on web1, from a
      tunnel to web1.  Further options of the inner string follow its own
      ``?``; to nest more than one level of options, percent-encode the
      inner string.

    The built-in schemes: ``ssh://[user@]host[:port]`` (:class:`chopsticks.Tunnel`),
    ``local://[name]`` (:class:`chopsticks.Local`), ``sudo://[user]``
    (:class:`chopsticks.Sudo`, default root) and ``docker://name``
    (:class:`chopsticks.Docker`; ``?image=python:3.12``).  Options such as
    ``?python=/usr/bin/python3`` go to the tunnel's constructor.

    Raises ``ValueError`` for an unknown scheme, naming the known ones.
    """
    return _tunnel_from_url(url, kwargs, 0)


def _tunnel_from_url(url: str, kwargs: dict, nesting: int) -> Any:
    if nesting > MAX_VIA_NESTING:
        raise ValueError(f"host {url!r} is nested through via= more than {MAX_VIA_NESTING} times")
    if "://" not in url:
        url = "local://" if url == "local" else "ssh://" + url
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    address, _, query = rest.partition("?")
    options = {key: parse_value(value) for key, value in parse_qsl(query, keep_blank_values=True)}
    pm = get_plugin_manager()
    try:
        factory = pm.lookup("tunnel", scheme)
    except UnknownNameError:
        known = ", ".join(f"{s}://" for s in sorted(pm.tunnels))
        raise ValueError(f"unknown tunnel scheme in host {url!r}: known schemes are {known} "
                         f"(a plugin can add one; see `chopsticks list-plugins`)") from None
    options.update(kwargs)
    via = options.get("via")
    if isinstance(via, str):
        try:
            options["via"] = _tunnel_from_url(via, {}, nesting + 1)
        except ValueError as exc:
            raise ValueError(f"bad via= in host {url!r}: {exc}") from None
    return factory(unquote(address), **options)


# -- the built-in tunnel schemes ---------------------------------------------


def _ssh_tunnel(address: str, **options: Any) -> Any:
    if not address:
        raise ValueError("ssh:// needs a host: ssh://[user@]host[:port] or an ssh_config alias")
    # Parsed as Tunnel parses its host (one parser), so that the tunnel is
    # built with user= and port= apart: its relay_spec carries them.
    host, user, port = tunnel.ssh_destination(address, options.pop("user", None),
                                              options.pop("port", None))
    if user is not None:
        options["user"] = user
    if port is not None:
        options["port"] = port
    return tunnel.Tunnel(host, **options)


def _local_tunnel(address: str, **options: Any) -> Any:
    if address:  # local://name: a display name, to tell several apart
        options.setdefault("name", address)
    return tunnel.Local(**options)


def _sudo_tunnel(address: str, **options: Any) -> Any:
    return tunnel.Sudo(address or "root", **options)


def _docker_tunnel(address: str, **options: Any) -> Any:
    if not address:
        raise ValueError("docker:// needs a container name: docker://NAME")
    return tunnel.Docker(address, **options)


class CoreTunnels:
    """The built-in plugin: chopsticks' own tunnel types."""

    @hookimpl
    def chopsticks_register_tunnels(self, register: Callable[..., None]) -> None:
        register("ssh", _ssh_tunnel)
        register("local", _local_tunnel)
        register("sudo", _sudo_tunnel)
        register("docker", _docker_tunnel)
        from .become import doas_tunnel, su_tunnel  # su://user, doas://user

        register("su", su_tunnel)
        register("doas", doas_tunnel)

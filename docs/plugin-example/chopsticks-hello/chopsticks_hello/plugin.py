"""Runs on the controller: tells chopsticks what this distribution provides."""
from chopsticks import SubprocessTunnel, hookimpl

from chopsticks_hello import touch, whoami


class Podman(SubprocessTunnel):
    """A python in a running podman container: podman://NAME."""

    def cmd_args(self):
        return ["podman", "exec", "-i", self.host]


@hookimpl
def chopsticks_register_facts(register):
    register(whoami)


@hookimpl
def chopsticks_register_tasks(register):
    register(touch)


@hookimpl
def chopsticks_register_tunnels(register):
    register("podman", lambda address, **options: Podman(address, **options))

"""The chopsticks plugin of chopsticks-pkg: registers the tasks (controller side only)."""
from chopsticks.hookspecs import hookimpl

import chopsticks_pkg


@hookimpl
def chopsticks_register_tasks(register):
    for task in chopsticks_pkg.TASKS.values():
        register(task)

"""The chopsticks plugin of chopsticks-system: registers the tasks (controller side only)."""
from chopsticks.hookspecs import hookimpl

import chopsticks_system


@hookimpl
def chopsticks_register_tasks(register):
    for task in chopsticks_system.TASKS.values():
        register(task)

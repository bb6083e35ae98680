"""The chopsticks plugin of chopsticks-files: registers the tasks (controller side only)."""
from chopsticks.hookspecs import hookimpl

import chopsticks_files


@hookimpl
def chopsticks_register_tasks(register):
    for task in chopsticks_files.TASKS.values():
        register(task)

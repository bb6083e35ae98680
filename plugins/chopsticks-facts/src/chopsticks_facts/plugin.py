"""The chopsticks plugin of chopsticks-facts: registers the facts (controller side only)."""
from chopsticks.hookspecs import hookimpl

import chopsticks_facts


@hookimpl
def chopsticks_register_facts(register):
    for fact in chopsticks_facts.FACTS.values():
        register(fact)

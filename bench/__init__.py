"""The chopsticks benchmark suite: ``python -m bench`` from the repository root."""

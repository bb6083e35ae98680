"""Test helpers for chopsticks: pytest fixtures and a loopback sshd."""

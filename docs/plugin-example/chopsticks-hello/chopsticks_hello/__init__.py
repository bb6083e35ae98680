"""Runs on the host: standard library only, Python 3.6 or newer."""
import getpass
import os


def whoami():
    """The user the host runs our calls as."""
    return getpass.getuser()


def touch(path, check=False):
    """Make sure a file exists."""
    changed = not os.path.exists(path)
    if changed and not check:
        open(path, "a").close()
    return {"changed": changed, "check": check, "path": path}

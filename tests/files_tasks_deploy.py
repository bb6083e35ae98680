"""A deployment for test_files_tasks.py, in its own module: the host imports
it (through chopsticks' import hook) and must not need pytest, so that a
Python 3.6 host can run it."""
import sys

from chopsticks_files import directory, file, line, link


def deploy_site(root, check=False):
    """A deployment: runs on the host, one call, tasks as plain functions."""
    results = {}
    results["dir"] = directory(root + "/etc", mode=0o755, check=check)
    results["conf"] = file(root + "/etc/app.conf", "port = 80\n", mode="0644", check=check)
    results["line"] = line(root + "/etc/hosts", "10.0.0.1 db", match=r"\sdb$", create=True,
                           check=check)
    results["link"] = link(root + "/current", "etc", check=check)
    return results


def python_version():
    return tuple(sys.version_info[:2])

"""The ``chopsticks`` command, run as a real subprocess against real Local tunnels.

Exit codes are part of the interface: 0 success, 1 a host failed, 2 a usage
error.  (The installed console script is exercised in test_plugins_venv.py.)
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from chopsticks import cli

if not os.environ.get("CI"):  # CI installs the plugins (.ci/run); elsewhere they may be missing
    pytest.importorskip("chopsticks_facts", reason="pip install -e plugins/chopsticks-facts")

import chopsticks_facts  # noqa: E402

has_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt (Debian)")


def chopsticks(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOPSTICKS_PLUGINS")}
    return subprocess.run([sys.executable, "-m", "chopsticks.cli", *args],
                          capture_output=True, text=True, env=env)


# -- facts ---------------------------------------------------------------------------


def test_facts_json():
    result = chopsticks("facts", "local", "--fact", "kernel", "-f", "hostname", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"local": {
        "kernel": chopsticks_facts.kernel(), "hostname": chopsticks_facts.hostname()}}


def test_facts_text_for_a_person():
    result = chopsticks("facts", "local", "local://second", "-f", "hostname", "-f", "kernel")
    assert result.returncode == 0, result.stderr
    # A nested value goes below its name, indented, its keys aligned.
    kernel = chopsticks_facts.kernel()
    width = max(len(key) for key in kernel)
    block = f"    hostname  {chopsticks_facts.hostname()}\n    kernel\n" + "".join(
        f"        {key.ljust(width)}  {value}\n" for key, value in kernel.items())
    assert result.stdout == f"local\n{block}local://second\n{block}"


def test_facts_default_to_every_registered_fact():
    values = json.loads(chopsticks("facts", "local", "--json").stdout)["local"]
    assert set(chopsticks_facts.FACTS) <= set(values)


def test_unreachable_host_fails_alone():
    bad = "local://broken?python=/nonexistent/python3"
    result = chopsticks("facts", "local", bad, "-f", "kernel", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["local"] == {"kernel": chopsticks_facts.kernel()}
    # The report names the host; the message does not again.
    assert report[bad]["error"].startswith("ConnectError: could not connect")


def test_unreachable_host_in_text():
    result = chopsticks("facts", "local://?python=/nonexistent/python3", "-f", "kernel")
    assert result.returncode == 1
    assert "    FAILED: ConnectError: " in result.stdout


@pytest.fixture
def complaining_python(tmp_path):
    """A "python" that prints two lines, one with an escape sequence, and exits."""
    script = tmp_path / "python3"
    script.write_text("#!/bin/sh\necho 'first complaint' >&2\n"
                      "printf 'second \\033[2J\\rFORGED\\n' >&2\nexit 3\n")
    script.chmod(0o755)
    return f"local://broken?python={script}"


@pytest.mark.parametrize("command, label, indent", [
    (["exec", "HOST", "--", "true"], "[broken] FAILED: could not connect: ", 4),
    (["facts", "HOST", "-f", "kernel"], "    FAILED: ConnectError: could not connect: ", 8),
    (["run", "HOST", "install", "bash", "--check"], "  failed   ConnectError: could not connect: ", -1),
])
def test_a_multi_line_failure_reads_as_lines_under_its_host(complaining_python, command,
                                                            label, indent):
    result = chopsticks(*[complaining_python if word == "HOST" else word for word in command])
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if label in line)
    if indent < 0:  # run: under the message, past the host column
        indent = len(complaining_python) + 4
    # The process's stderr (ssh's, over ssh) below the message, a line each,
    # indented under it; the escape sequence escaped, the \\r a line break.
    assert lines[at + 1:at + 4] == [" " * indent + "  first complaint",
                                    " " * indent + "  second \\x1b[2J",
                                    " " * indent + "  FORGED"]
    assert "\\n" not in result.stdout and "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "[broken] could not connect" not in result.stdout  # the host named once


@pytest.mark.parametrize("args, message", [
    (["facts", "local", "-f", "kernal"], "No chopsticks fact is named 'kernal'. Did you mean 'kernel'?"),
    (["facts", "podman://web"], "bad host 'podman://web': unknown tunnel scheme"),
    (["facts"], "Missing argument 'HOST...'"),
    (["run", "local"], "no task in 'local'"),
    (["run", "local", "instal", "hello"], "Did you mean 'install' instead of 'instal'?"),
    (["facts", "local", "--no-such-option"], "No such option"),
    # Two HOST words naming one host, for every command that reaches hosts.
    (["exec", "local", "localhost", "--", "true"],
     "two different tunnels are named 'localhost'"),
    (["exec", "web1", "ssh://web1", "--", "true"], "two different tunnels are named 'web1'"),
    (["exec", "--json", "local", "localhost", "--", "true"], "(hosts: local localhost)"),
    (["facts", "local", "localhost", "-f", "kernel"], "(hosts: local localhost)"),
    (["run", "local", "localhost", "install", "bash"], "(hosts: local localhost)"),
])
def test_usage_errors_exit_2(args, message):
    result = chopsticks(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


# -- run -------------------------------------------------------------------------------


@has_apt
def test_run_check_reports_the_plan():
    result = chopsticks("run", "local", "local://two", "install", "bash", "--check", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"local", "local://two"}
    assert report["local"] == {"changed": False, "check": True, "manager": "apt",
                               "installed": {}, "upgraded": {}, "removed": {}}


@has_apt
def test_run_text_says_changed_ok_or_failed_per_host():
    result = chopsticks("run", "local", "remove", "chopsticks-not-installed", "--check")
    assert (result.returncode, result.stdout) == (0, "local  ok       manager: apt\n")
    result = chopsticks("run", "local", "install", "chopsticks-no-such-package", "--check")
    assert result.returncode == 1
    assert result.stdout.startswith("local  failed   chopsticks_pkg.backends.PackageError: ")
    assert "apt knows no package named 'chopsticks-no-such-package'" in result.stdout


def test_task_arguments_keywords_only_for_the_tasks_parameters():
    def task(*packages, max_age=0, check=False):
        pass

    assert cli._task_arguments(task, ["hello=2.10-3", "max_age=3600", "check=true", "[1, 2]"]) == (
        ["hello=2.10-3", "check=true", [1, 2]], {"max_age": 3600})


# -- list-plugins and help ----------------------------------------------------------------


def test_list_plugins():
    result = chopsticks("list-plugins")
    assert result.returncode == 0
    assert result.stdout.startswith("chopsticks  chopsticks ")
    assert f"facts  chopsticks-facts {chopsticks_facts.__version__}  ok\n" in result.stdout
    listed = json.loads(chopsticks("list-plugins", "--json").stdout)
    assert {"chopsticks", "facts"} <= {p["name"] for p in listed}


def test_help_and_version():
    result = chopsticks("--help")
    assert result.returncode == 0
    for command in ("facts", "list-plugins", "run"):
        assert command in result.stdout
    assert chopsticks("--version").stdout.startswith("chopsticks, version ")

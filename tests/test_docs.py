"""The documentation site (docs/) is built, complete, and its examples run.

* The site builds with Sphinx, warnings as errors, offline.
* Every public name has an entry in the API reference: the names in
  ``chopsticks.__all__``, in the ``__all__`` of every public module of the
  package, and in the ``__all__`` of the plugin distributions' packages.
  A name counts as documented when the site's ``objects.inv`` holds it under
  any module that exports that same object.
* Every hook in ``chopsticks/hookspecs.py`` has its entry in the hook
  reference.
* Every ``.. code-block:: python`` on a page (and in README.rst) either
  runs or says why not.
  Blocks marked ``:class: runnable`` run, page by page, top to bottom, as
  one script in a fresh interpreter (functions in it travel as source, as
  in a user's script), against ``Local`` tunnels and a loopback OpenSSH
  server whose ssh_config aliases are ``web1``, ``web2``, ``web3`` and
  ``db1``, in a directory holding the files of ``docs/examples``.  Any other Python block must follow a comment
  ``.. not run: <reason>``.
* The plugin author's guide's complete example (``docs/plugin-example``)
  registers its fact, task and tunnel type, and its own tests pass.

``.ci/run`` builds the site before the tests and sets
``CHOPSTICKS_DOCS_HTML`` to it; without it, the build happens here.
"""
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sphinx = pytest.importorskip("sphinx", reason="pip install -e '.[docs]'")
from sphinx.util.inventory import InventoryFile  # noqa: E402

import chopsticks  # noqa: E402
from chopsticks import hookspecs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PLUGIN_EXAMPLE = DOCS / "plugin-example" / "chopsticks-hello"
PAGES = [ROOT / "README.rst"] + sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)
DOC_HOSTS = ("web1", "web2", "web3", "db1")

# The packages of the plugin distributions whose tasks and facts the reference covers.
PLUGIN_PACKAGES = ("chopsticks_facts", "chopsticks_pkg", "chopsticks_files", "chopsticks_system")
# Not importable on the controller by design: the agent runs only on hosts.
HOST_ONLY_MODULES = {"chopsticks.agent"}

pytestmark = pytest.mark.timeout(900)


# -- the build -------------------------------------------------------------------


def sphinx_build(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / ".doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site's directory (built here unless .ci/run built it already)."""
    prebuilt = os.environ.get("CHOPSTICKS_DOCS_HTML")
    if prebuilt and (Path(prebuilt) / "objects.inv").exists():
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("site")
    result = sphinx_build(out)
    assert result.returncode == 0, (
        "sphinx-build -W failed:\n" + result.stdout + result.stderr)
    return out


@pytest.fixture(scope="module")
def inventory(site):
    with open(site / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", os.path.join)
    names = set()
    for entries in inv.values():
        names.update(entries)
    return names


def test_site_builds_without_warnings(site):
    assert (site / "index.html").exists()
    for page in ("tutorial", "plugins", "changelog", "reference/cli", "reference/hooks"):
        assert (site / f"{page}.html").exists(), page
    # Errors docutils or the theme put in a page rather than in the build's output:
    # Furo shows a `.. contents::` (class "contents") as an error box.
    for page in site.rglob("*.html"):
        text = page.read_text()
        for error in ('class="system-message"', 'class="contents'):
            assert error not in text, f"{page.relative_to(site)} shows an error: {error}"


# -- every public name has an entry ---------------------------------------------------


def public_modules():
    """Modules whose ``__all__`` is public API: chopsticks' own and the plugins' packages."""
    modules = [chopsticks]
    for info in pkgutil.walk_packages(chopsticks.__path__, "chopsticks."):
        if info.name in HOST_ONLY_MODULES or any(
                part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "__all__"):
            modules.append(module)
    for name in PLUGIN_PACKAGES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            if os.environ.get("CI"):  # .ci/run installs every plugin distribution
                raise
    return modules


def public_names():
    """``[(module, name)]`` for every name in a public ``__all__``."""
    return [(module, name) for module in public_modules() for name in module.__all__]


def documented_as(module, name):
    """Every dotted name under which this object may be documented."""
    obj = getattr(module, name)
    candidates = {f"{module.__name__}.{name}"}
    for other in public_modules():
        try:
            if getattr(other, name) is obj:
                candidates.add(f"{other.__name__}.{name}")
        except AttributeError:
            pass
    defined_in = getattr(obj, "__module__", None)
    if isinstance(defined_in, str) and getattr(obj, "__qualname__", None) == name:
        candidates.add(f"{defined_in}.{name}")
    return candidates


def test_every_public_name_is_in_the_reference(inventory):
    names = public_names()
    missing = sorted(f"{module.__name__}.{name}" for module, name in names
                     if not documented_as(module, name) & inventory)
    covered = len(names) - len(missing)
    print(f"the API reference covers {covered} of {len(names)} public names")
    assert not missing, (
        f"{len(missing)} public names have no entry in the API reference (docs/reference/): "
        + ", ".join(missing))


HOOK_NAMES = sorted(name for name in dir(hookspecs) if name.startswith("chopsticks_"))


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_is_in_the_hook_reference(hook, inventory):
    assert f"chopsticks.hookspecs.{hook}" in inventory, (
        f"{hook} has no entry in docs/reference/hooks.rst")


def test_every_cli_command_is_in_the_cli_reference(site):
    from chopsticks.cli import main
    text = (site / "reference" / "cli.html").read_text()
    for command in main.commands:
        assert f'id="chopsticks-{command}"' in text, (
            f"`chopsticks {command}` has no section in the CLI reference")


# -- examples ---------------------------------------------------------------------------

BLOCK = re.compile(
    r"^(?P<indent>[ ]*)\.\. code(?:-block)?:: python3?[ ]*\n"
    r"(?P<options>(?:(?P=indent)[ ]+:[\w-]+:.*\n)*)"
    r"\n"
    r"(?P<body>(?:(?P=indent)[ ]+.*\n|[ ]*\n)+)",
    re.MULTILINE)
NOT_RUN = re.compile(r"^[ ]*\.\. not run: \S.*$")


def python_blocks(page: Path):
    """``[(line number, runnable, reason or None, code)]`` for each Python block of a page."""
    text = page.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        runnable = bool(re.search(r":class:.*\brunnable\b", match.group("options")))
        before = text[:match.start()].rstrip("\n").splitlines()
        reason = before[-1] if before and NOT_RUN.match(before[-1]) else None
        code = textwrap.dedent(match.group("body")).strip("\n") + "\n"
        blocks.append((line, runnable, reason, code))
    return blocks


def test_every_python_block_runs_or_says_why_not():
    unexplained = []
    for page in PAGES:
        for line, runnable, reason, _ in python_blocks(page):
            if not runnable and reason is None:
                unexplained.append(f"{page.relative_to(ROOT)}:{line}")
    assert not unexplained, (
        "Python examples neither marked `:class: runnable` nor preceded by "
        "`.. not run: <reason>`: " + ", ".join(unexplained))


RUNNABLE_PAGES = [p for p in PAGES if any(b[1] for b in python_blocks(p))]


@pytest.fixture(scope="module")
def doc_hosts():
    """A loopback sshd whose aliases are the host names the examples use."""
    from chopsticks.testing.sshd import LoopbackSSHD, SSHDNotFound
    try:
        server = LoopbackSSHD(aliases=DOC_HOSTS)
    except SSHDNotFound as exc:
        if os.environ.get("CHOPSTICKS_REQUIRE_SSHD"):
            raise
        pytest.skip(f"{exc} (set CHOPSTICKS_REQUIRE_SSHD=1 to make this an error)")
    try:
        yield server
    finally:
        server.stop()


def page_script(page: Path) -> str:
    """A page's runnable blocks, in order, as one script; comments say where each came from."""
    parts = []
    for line, runnable, _, code in python_blocks(page):
        if runnable:
            parts.append(f"# ---- {page.relative_to(ROOT)}, line {line}\n{code}")
    return "\n".join(parts)


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page, doc_hosts, tmp_path):
    for example in (DOCS / "examples").iterdir():  # files the pages load: hosts.toml, ...
        shutil.copy(example, tmp_path / example.name)
    script = tmp_path / (page.stem + "_example.py")
    script.write_text(page_script(page))
    env = dict(os.environ, **doc_hosts.env())
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"the examples of {page.relative_to(ROOT)} failed (the script, {script}, marks "
        f"where each block starts):\n{result.stdout}\n{result.stderr}")


# -- the plugin author's guide's example -------------------------------------------------


@pytest.fixture
def hello_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_EXAMPLE))
    for name in [m for m in sys.modules if m.startswith("chopsticks_hello")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("chopsticks_hello.plugin")


def test_plugin_example_registers(hello_plugin, chopsticks_plugin_manager, chopsticks_local,
                                  tmp_path):
    from chopsticks.plugins import tunnel_from_url
    chopsticks_plugin_manager.register(hello_plugin)
    from chopsticks import facts, tasks
    import chopsticks_hello
    assert facts.whoami is chopsticks_hello.whoami
    assert tasks.touch is chopsticks_hello.touch
    marker = tmp_path / "marker"
    assert chopsticks_local.call(tasks.touch, str(marker), check=True)["changed"]
    assert not marker.exists()
    assert chopsticks_local.call(tasks.touch, str(marker))["changed"]
    assert not chopsticks_local.call(tasks.touch, str(marker))["changed"]
    podman = tunnel_from_url("podman://web?python=/usr/bin/python3")
    assert podman.argv()[:4] == ["podman", "exec", "-i", "web"]
    info = {p.name: p for p in chopsticks_plugin_manager.plugins()}
    registered = [p for p in info.values() if "whoami" in p.as_dict()["facts"]]
    assert registered and registered[0].as_dict()["status"] == "ok"


def test_plugin_example_own_tests_pass(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(PLUGIN_EXAMPLE))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         str(PLUGIN_EXAMPLE / "tests")],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout

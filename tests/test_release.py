"""The release: what ``pip install chopsticks`` and a plugin author get.

Every distribution is checked: the top level and each ``plugins/*/`` that has
a pyproject.toml, so a new plugin must comply too.  Two kinds of test:

* metadata checks read the pyproject.toml files and READMEs; they take a
  moment and always run;
* ``release`` tests build the sdists and wheels (or take them from
  ``$CHOPSTICKS_DIST_DIR``, where ``.ci/run`` built them), list what they
  carry, and install the wheels into a fresh virtualenv the way a user would.
  About a minute; deselect them with ``-m 'not release'``.

Installing needs the package index (fabric, pluggy and click come from it),
as any user's install does.
"""
import ast
import email.parser
import ipaddress
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = [ROOT] + sorted(path.parent for path in ROOT.glob("plugins/*/pyproject.toml"))
PLUGINS = PROJECTS[1:]

# One home for every distribution.
HOME = "https://github.com/lordmauve/chopsticks"
DOCS = "https://chopsticks.readthedocs.io/"
URLS = {
    "Homepage": HOME,
    "Documentation": DOCS,
    "Issues": HOME + "/issues",
    "Changelog": DOCS + "en/latest/changelog.html",
}
REQUIRED_CLASSIFIERS = {
    "Operating System :: POSIX",
    "Operating System :: POSIX :: Linux",
    "Operating System :: MacOS",
    "Programming Language :: Python :: 3 :: Only",
    # The controller's Pythons (hosts run 2.7 and 3.6+, but nothing is installed there).
    *("Programming Language :: Python :: 3.%d" % minor for minor in range(9, 14)),
    "Topic :: System :: Systems Administration",
    "Topic :: System :: Distributed Computing",
    "Topic :: Software Development :: Libraries",
}
# setuptools 77 reads `license` as an SPDX expression and `license-files`.
MIN_SETUPTOOLS = "77"
# Python warnings (SetuptoolsDeprecationWarning: ...) and distutils' "warning: ..."
# lines in a build's output; pip's "WARNING:" about the machine's index setup is not ours.
BUILD_WARNING = re.compile(r"[A-Za-z]Warning:|^warning: ", re.MULTILINE)


def pyproject(project: Path) -> dict:
    with open(project / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def dist_name(project: Path) -> str:
    return pyproject(project)["project"]["name"]


def version_attr(project: Path) -> str:
    """``chopsticks.__version__``: where setuptools reads the version."""
    return pyproject(project)["tool"]["setuptools"]["dynamic"]["version"]["attr"]


def package_dir(project: Path) -> Path:
    """The directory of the distribution's one top-level package."""
    where = pyproject(project)["tool"]["setuptools"]["packages"]["find"].get("where", ["."])
    (where,) = where
    return project / where / version_attr(project).split(".")[0]


def module_version(project: Path) -> str:
    """The ``__version__`` literal, read as setuptools reads it: without importing."""
    tree = ast.parse((package_dir(project) / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{package_dir(project)}/__init__.py sets no __version__")


VERSION = module_version(ROOT)


def package_sources(project: Path, relative_to: Optional[Path] = None) -> List[str]:
    """The package's modules, relative to the project (as in its sdist) or to ``relative_to``."""
    return sorted(str(path.relative_to(relative_to or project))
                  for path in package_dir(project).rglob("*.py") if "__pycache__" not in path.parts)


def assert_requires_this_major(requirement: Requirement, where: str) -> None:
    """A requirement on a chopsticks distribution admits this release and nothing before it.

    ``chopsticks`` alone would let pip pick the package index's unrelated 1.0.
    """
    major = Version(VERSION).major
    spec = requirement.specifier
    assert spec.contains(VERSION), f"{where}: {requirement} excludes this release, {VERSION}"
    for older in (f"{major - 1}.0", f"{major - 1}.999", f"{major}.0.0.dev0"):
        assert not spec.contains(older, prereleases=True), (
            f"{where}: {requirement} admits {older}; write '{requirement.name}>={major}.0'")


def project_id(project: Path) -> str:
    return dist_name(project)


def release(test):
    """A test that builds or installs: deselect with -m 'not release'.  The index can be slow."""
    return pytest.mark.release(pytest.mark.timeout(900)(test))


each_project = pytest.mark.parametrize("project", PROJECTS, ids=project_id)
each_plugin = pytest.mark.parametrize("project", PLUGINS, ids=project_id)


# -- metadata, from pyproject.toml -------------------------------------------------


def test_the_plugins_are_found():
    assert {"chopsticks-facts", "chopsticks-pkg"} <= {dist_name(p) for p in PLUGINS}


@each_project
def test_version_is_final_and_defined_once(project):
    """pip passes over a pre-release when a final one (the index's 1.0) exists."""
    meta = pyproject(project)
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"], (
        "the version belongs in the package's __version__ alone: "
        "dynamic = [\"version\"] and [tool.setuptools.dynamic] version = {attr = ...}")
    assert version_attr(project).endswith(".__version__")
    version = Version(module_version(project))
    assert not version.is_prerelease and not version.is_postrelease and not version.local
    # The distributions are released together, at one version.
    assert str(version) == VERSION


@each_plugin
def test_plugin_requires_this_chopsticks(project):
    requirements = [Requirement(r) for r in pyproject(project)["project"]["dependencies"]]
    names = {canonicalize_name(r.name): r for r in requirements}
    assert "chopsticks" in names, f"{dist_name(project)} does not depend on chopsticks"
    for requirement in requirements:
        if canonicalize_name(requirement.name).startswith("chopsticks"):
            assert_requires_this_major(requirement, f"{dist_name(project)}'s dependencies")


def plugin_templates() -> Dict[str, str]:
    """The plugin pyproject.toml examples in the documentation, by where they are."""
    pages = [ROOT / "README.rst", *sorted((ROOT / "docs").rglob("*.rst")),
             *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "docs").rglob("pyproject.toml"))]  # the plugin guide's example
    templates = {}
    for page in pages:
        text = page.read_text().replace("\n    ", "\n")  # code blocks unindented
        for match in re.finditer(r"^\[project\]\n(?:.*\n)*?\[project\.entry-points\.chopsticks\]",
                                 text, re.MULTILINE):
            line = text[:match.start()].count("\n") + 1
            templates[f"{page.relative_to(ROOT)}:{line}"] = match.group(0)
    return templates


def test_plugin_template_requires_this_chopsticks():
    templates = plugin_templates()
    assert templates, "the documentation has no plugin pyproject.toml with [project.entry-points.chopsticks]"
    for where, template in templates.items():
        dependencies = re.search(r"^dependencies = (\[.*?\])", template, re.MULTILINE | re.DOTALL)
        assert dependencies, f"{where}: the template declares no dependencies"
        requirements = [Requirement(r) for r in ast.literal_eval(dependencies.group(1))]
        (chopsticks,) = [r for r in requirements if r.name == "chopsticks"]
        assert_requires_this_major(chopsticks, where)


@each_project
def test_license_is_declared_and_shipped(project):
    meta = pyproject(project)["project"]
    assert meta["license"] == "Apache-2.0"          # an SPDX expression, not the deprecated table
    assert meta["license-files"] == ["LICENSE"]
    assert not [c for c in meta["classifiers"] if c.startswith("License ::")], (
        "a License classifier beside an SPDX license expression is refused by setuptools")
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    # A distribution's license-files live in its own directory: a copy each.
    assert (project / "LICENSE").read_text() == text


@each_project
def test_build_requires_a_setuptools_that_knows_spdx(project):
    (setuptools,) = [Requirement(r) for r in pyproject(project)["build-system"]["requires"]
                     if Requirement(r).name == "setuptools"]
    assert setuptools.specifier.contains(MIN_SETUPTOOLS)
    assert not setuptools.specifier.contains("76.1"), (
        f"{dist_name(project)}: build-system requires {setuptools}; write setuptools>={MIN_SETUPTOOLS}")


@each_project
def test_index_metadata_is_complete(project):
    meta = pyproject(project)["project"]
    assert meta["authors"] and all(author.get("name") for author in meta["authors"])
    assert meta["keywords"] and meta["description"]
    assert meta["readme"] == "README.rst"
    assert meta["requires-python"] == ">=3.9"
    missing = REQUIRED_CLASSIFIERS - set(meta["classifiers"])
    assert not missing, f"{meta['name']} lacks the classifiers {sorted(missing)}"
    urls = meta["urls"]
    assert {name: urls.get(name) for name in URLS} == URLS
    assert urls["Source"].startswith(HOME)


@each_project
def test_classifiers_exist(project):
    """The package index refuses an upload with an unknown classifier."""
    if not os.environ.get("CI"):
        pytest.importorskip("trove_classifiers", reason="pip install -e '.[release]'")
    from trove_classifiers import classifiers
    unknown = set(pyproject(project)["project"]["classifiers"]) - classifiers
    assert not unknown


@each_project
def test_readme_links_are_absolute(project):
    """The README is the package index page: a relative link goes nowhere there."""
    text = (project / "README.rst").read_text()
    targets = re.findall(r"`[^`<]*<([^<>\s]+)>`__?", text) + re.findall(r"^\.\. _[^:]+:\s*(\S+)", text, re.MULTILINE)
    relative = [t for t in targets if not t.startswith("https://")]
    assert not relative, f"{project.relative_to(ROOT)}/README.rst links to {relative}"


# -- the built distributions --------------------------------------------------------


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory) -> Path:
    """The sdists and wheels: .ci/run's, else built here (a few seconds each)."""
    given = os.environ.get("CHOPSTICKS_DIST_DIR")
    if given:
        return Path(given).resolve()
    if not os.environ.get("CI"):
        pytest.importorskip("build", reason="pip install -e '.[release]'")
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for project in PROJECTS:
        result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(project)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert result.returncode == 0, result.stdout
        assert not BUILD_WARNING.findall(result.stdout), (
            f"building {project} warned:\n" + "\n".join(
                line for line in result.stdout.splitlines() if BUILD_WARNING.search(line)))
    return out


def built(dist_dir: Path, project: Path, suffix: str) -> Path:
    """The one file built for ``project``: ``chopsticks_facts-2.0.0.tar.gz``, say."""
    stem = canonicalize_name(dist_name(project)).replace("-", "_")
    pattern = f"{stem}-{VERSION}.tar.gz" if suffix == "sdist" else f"{stem}-{VERSION}-py3-none-any.whl"
    found = list(dist_dir.glob(pattern))
    assert found, f"no {pattern} in {dist_dir}: {sorted(p.name for p in dist_dir.iterdir())}"
    return found[0]


@release
@each_project
def test_sdist_carries_the_package_and_no_tests(dist_dir, project):
    """The test suite needs the whole repository (conftest, helpers, plugins, an sshd), so
    the sdist carries none of it: package, README, LICENSE and build configuration only."""
    sdist = built(dist_dir, project, "sdist")
    top = sdist.name[:-len(".tar.gz")]
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers()
                   if "/" in m.name and m.isfile()}
    tests = sorted(m for m in members
                   if m.startswith("tests/") or re.search(r"(^|/)(test_[^/]*|conftest)\.py$", m))
    assert not tests, f"{top} ships tests without what they need: {tests}"
    assert {"PKG-INFO", "pyproject.toml", "README.rst", "LICENSE"} <= members
    assert set(package_sources(project)) <= members
    package_top = package_sources(project)[0].split("/")[0]
    allowed = ("PKG-INFO", "pyproject.toml", "README.rst", "LICENSE", "MANIFEST.in", "setup.cfg")
    extra = sorted(m for m in members
                   if m not in allowed and not m.startswith(package_top + "/")
                   and ".egg-info/" not in m)
    assert not extra, f"{top} carries {extra}"


@release
@each_project
def test_wheel_metadata(dist_dir, project):
    wheel = built(dist_dir, project, "wheel")
    info = f"{wheel.name.split('-')[0]}-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        shipped_license = archive.read(f"{info}/licenses/LICENSE").decode()
        names = set(archive.namelist())
    assert metadata["Name"] == dist_name(project)
    assert metadata["Version"] == VERSION and not Version(metadata["Version"]).is_prerelease
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert shipped_license == (ROOT / "LICENSE").read_text()
    assert REQUIRED_CLASSIFIERS <= set(metadata.get_all("Classifier"))
    assert {url.split(", ")[0] for url in metadata.get_all("Project-URL")} >= set(URLS)
    assert set(package_sources(project, relative_to=package_dir(project).parent)) <= names
    for requirement in map(Requirement, metadata.get_all("Requires-Dist") or []):
        if canonicalize_name(requirement.name).startswith("chopsticks"):
            assert_requires_this_major(requirement, f"{wheel.name} Requires-Dist")


@release
def test_twine_check_strict(dist_dir):
    """What the package index would say about each file (the README renders, the metadata parses)."""
    if not os.environ.get("CI"):
        pytest.importorskip("twine", reason="pip install -e '.[release]'")
    files = sorted(str(p) for p in dist_dir.iterdir() if p.name.endswith((".whl", ".tar.gz")))
    assert len(files) == 2 * len(PROJECTS)
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *files],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, NO_COLOR="1"))
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("PASSED") == len(files), result.stdout


# -- installed from the wheels, as a user would --------------------------------------


@pytest.fixture(scope="module")
def installed(dist_dir, tmp_path_factory):
    """A fresh virtualenv where ``pip install chopsticks chopsticks-facts ...`` ran with the
    built wheels beside the package index, which has the unrelated chopsticks 1.0.

    Returns the venv's bin directory and pip's report of what it installed from where.
    """
    root = tmp_path_factory.mktemp("release-venv")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    bin_dir = root / "venv" / "bin"
    names = [dist_name(p) for p in PROJECTS]
    report = root / "pip-report.json"
    result = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--find-links", str(dist_dir),
         # ours from the wheels alone, never built from an sdist
         "--only-binary", ",".join(names), "--report", str(report), *names],
        env=clean_env(bin_dir), cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    assert result.returncode == 0, result.stdout
    installs = {canonicalize_name(item["metadata"]["name"]): item
                for item in json.loads(report.read_text())["install"]}
    return {"bin": bin_dir, "installs": installs, "cwd": root}


def clean_env(bin_dir: Path) -> Dict[str, str]:
    """The environment a user's shell would have: nothing pointing into this checkout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CHOPSTICKS_PLUGINS", "CHOPSTICKS_DISABLE"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def run_installed(installed, *argv):
    result = subprocess.run(argv, env=clean_env(installed["bin"]), cwd=str(installed["cwd"]),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@release
@each_project
def test_pip_picks_the_built_wheel_of_this_release(installed, dist_dir, project):
    """With the index's chopsticks 1.0 in reach, pip takes 2.0.0 (a final release) from the wheel."""
    item = installed["installs"][canonicalize_name(dist_name(project))]
    assert item["metadata"]["version"] == VERSION
    url = item["download_info"]["url"]
    assert url == built(dist_dir, project, "wheel").as_uri()


@release
def test_installed_package_is_the_venvs(installed):
    out = run_installed(installed, str(installed["bin"] / "python"), "-c",
                        "import chopsticks, sys; print(chopsticks.__version__); print(chopsticks.__file__)")
    version, location = out.stdout.split()
    assert version == VERSION
    assert Path(location).is_relative_to(installed["bin"].parent) and ROOT not in Path(location).parents


@release
def test_installed_list_plugins(installed):
    result = run_installed(installed, str(installed["bin"] / "chopsticks"), "list-plugins")
    lines = result.stdout.splitlines()
    assert lines[0] == f"chopsticks  chopsticks {VERSION}  ok"
    for plugin in PLUGINS:
        assert re.search(rf"^\S+  {re.escape(dist_name(plugin))} {re.escape(VERSION)}  ok$",
                         result.stdout, re.MULTILINE), result.stdout
    assert result.stderr == ""  # a plugin that fails to load warns here


@release
def test_installed_facts_ip_on_a_local_tunnel(installed):
    result = run_installed(installed, str(installed["bin"] / "python"), "-c",
                           "from chopsticks import Local, facts; print(Local().call(facts.ip))")
    address = result.stdout.strip()
    ipaddress.ip_address(address)  # raises on anything else
    try:
        from chopsticks_facts import ip
    except ImportError:  # only CI is sure to have the plugin installed here
        return
    assert address == ip()

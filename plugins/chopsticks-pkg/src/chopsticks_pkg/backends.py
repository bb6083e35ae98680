"""The package managers: what is installed, what would be installed, and how to change it.

Each backend runs its manager's query commands in the C locale and parses
their documented output formats (the ``parse_*`` functions, tested on
recorded outputs).  Runs on the host: standard library only, Python 3.6+.
What only some managers need (json for brew, re for yum) is imported where used.
"""
import os
import subprocess
import time

from chopsticks_facts import package_manager


class PackageError(Exception):
    """A package manager failed, or was asked for something it cannot do."""


def _text(argv, env, ok_codes=(0,)):
    full_env = dict(os.environ, LC_ALL="C", LANG="C", **env)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, universal_newlines=True, env=full_env)
    except OSError as exc:
        raise PackageError("cannot run %s: %s" % (argv[0], exc))
    out, err = proc.communicate()
    if proc.returncode not in ok_codes:
        tail = "\n".join((err.strip() or out.strip()).splitlines()[-15:])
        raise PackageError("`%s` failed with exit status %d:\n%s" % (
            " ".join(argv), proc.returncode, tail))
    return out


# -- parsers of each manager's output format ---------------------------------


def _add_version(result, name, version):
    if name in result and version not in result[name].split(", "):
        result[name] = ", ".join(sorted(result[name].split(", ") + [version]))
    else:
        result[name] = version


def _without_arch(name, separator, native_arch, plain_archs=()):
    """``name`` without its architecture suffix if that is the host's own (or in ``plain_archs``)."""
    base, sep, arch = name.rpartition(separator)
    if sep and base and (arch == native_arch or arch in plain_archs):
        return base
    return name


def parse_dpkg_query(text, native_arch=None):
    """``dpkg-query -W -f '${db:Status-Abbrev}\\t${binary:Package}\\t${Version}\\n'``.

    Only packages whose current state is installed (``ii``, and the trigger
    states ``iW``/``it``) count; ``rc`` (removed, config files left) does not.
    dpkg names Multi-Arch "same" packages with their architecture
    (``libc6:amd64``): the host's own architecture (``native_arch``) is
    dropped, as apt-get takes ``libc6`` for it; a foreign one is kept.
    """
    installed = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and len(parts[0]) >= 2 and parts[0][1] in "iWt":
            installed[_without_arch(parts[1], ":", native_arch)] = parts[2]
    return installed


def _apt_policy_blocks(text, native_arch):
    """``(name, candidate, [versions])`` per package of ``apt-cache policy``."""
    name, candidate, versions, in_table = None, None, [], False
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            if name:
                yield name, candidate, versions
            name, candidate, versions, in_table = _without_arch(line[:-1], ":", native_arch), None, [], False
        elif not name:
            continue
        elif line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            candidate = None if version == "(none)" else version
        elif line.strip() == "Version table:":
            in_table = True
        elif in_table:
            # a version line is indented 5 columns (" *** " marks the installed
            # one); the sources under it ("500 http://...") are indented more
            fields = line.replace(" *** ", "     ", 1).split()
            if len(line) - len(line.lstrip()) in (1, 5) and len(fields) == 2:
                versions.append(fields[0])
    if name:
        yield name, candidate, versions


def parse_apt_cache_policy(text, native_arch=None):
    """``apt-cache policy NAME...``: ``{name: candidate version or None}``."""
    return {name: candidate for name, candidate, _ in _apt_policy_blocks(text, native_arch)}


def parse_apt_cache_versions(text, native_arch=None):
    """``apt-cache policy NAME...``: ``{name: [every version of the version table]}``."""
    return {name: versions for name, _, versions in _apt_policy_blocks(text, native_arch)}


def _strip_zero_epoch(version):
    return version[2:] if version.startswith("0:") else version


_RPM_PLAIN_ARCHS = ("noarch", "(none)")
_RPM_ARCHS = ("x86_64", "i686", "i586", "i386", "aarch64", "armv7hl", "ppc64le", "s390x", "riscv64")


def _rpm_name(name, arch, native_arch):
    """``name``, or ``name.arch`` for a foreign architecture (``glibc.i686`` on x86_64), as dnf takes them."""
    if native_arch is None or arch in (native_arch,) + _RPM_PLAIN_ARCHS:
        return name
    return "%s.%s" % (name, arch)


def parse_rpm_query(text, native_arch=None):
    """``rpm -qa --qf '%{NAME}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\t%{ARCH}\\n'``.

    Several installed versions of one name (kernels) are joined by ``', '``;
    ``gpg-pubkey`` entries are not packages.  Given the host's architecture
    (``native_arch``), a package of another one is named ``name.arch``.
    """
    installed = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0] != "gpg-pubkey":
            name = _rpm_name(parts[0], parts[2] if len(parts) > 2 else None, native_arch)
            _add_version(installed, name, _strip_zero_epoch(parts[1]))
    return installed


_YUM_HEADERS = (r"^(Available|Installed|Updated|Upgraded|Extra|Obsoleting) Packages|"
                r"^Last metadata expiration check|^Error:")


def _yum_entries(text, native_arch):
    import re

    headers = re.compile(_YUM_HEADERS)
    tokens = []
    for line in text.splitlines():
        if headers.match(line):
            continue
        tokens.extend(line.split())
        while len(tokens) >= 3:
            name_arch, version = tokens[0], tokens[1]
            tokens = tokens[3:]
            name, _, arch = name_arch.rpartition(".")
            yield _rpm_name(name, arch, native_arch), _strip_zero_epoch(version)


def parse_yum_list(text, native_arch=None):
    """``dnf list --available NAME...`` / ``yum list available NAME...``: newest version by name.

    Each entry is ``name.arch version repo``; yum wraps a long name onto its
    own line, so entries are read as whitespace-separated triples.  Given
    the host's architecture, a package of another one is named ``name.arch``.
    """
    return dict(_yum_entries(text, native_arch))


def parse_yum_versions(text, native_arch=None):
    """``dnf list --available --showduplicates NAME...``: ``{name: [every version]}``."""
    versions = {}
    for name, version in _yum_entries(text, native_arch):
        versions.setdefault(name, []).append(version)
    return versions


def _split_apk(pkgver):
    name, version, release = pkgver.rsplit("-", 2)
    return name, "%s-%s" % (version, release)


def parse_apk_info(text):
    """``apk info -v``: one ``name-version-rN`` per line."""
    installed = {}
    for line in text.splitlines():
        line = line.strip()
        if line.count("-") >= 2 and not line.startswith("WARNING"):
            name, version = _split_apk(line)
            installed[name] = version
    return installed


def _apk_list_entries(text):
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0].count("-") >= 2 and not line.startswith("WARNING"):
            yield _split_apk(fields[0])


def parse_apk_list(text):
    """``apk list NAME...``: ``name-version-rN arch {origin} (license) [status]``, newest per name."""
    return dict(_apk_list_entries(text))


def parse_apk_versions(text):
    """``apk list NAME...``: ``{name: [every version the repositories offer]}``."""
    versions = {}
    for name, version in _apk_list_entries(text):
        versions.setdefault(name, []).append(version)
    return versions


def parse_pacman_query(text):
    """``pacman -Q``: ``name version`` per line."""
    return dict(line.split(None, 1) for line in text.splitlines() if len(line.split()) == 2)


def _colon_blocks(text):
    """``Key : value`` blocks separated by blank lines (``pacman -Si``, ``zypper info``)."""
    blocks, block = [], {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not line.strip():
            if block:
                blocks.append(block)
            block = {}
        elif sep and not line[0].isspace():
            block.setdefault(key.strip(), value.strip())
    if block:
        blocks.append(block)
    return blocks


def parse_pacman_info(text):
    """``pacman -Si NAME...``: ``{name: version}`` of the sync databases."""
    return {b["Name"]: b["Version"] for b in _colon_blocks(text) if "Name" in b and "Version" in b}


def parse_zypper_info(text, native_arch=None):
    """``zypper info NAME...``: ``{name: version}`` of the best candidate.

    Given the host's architecture, a package of another one is named ``name.arch``.
    """
    return {_rpm_name(b["Name"], b.get("Arch"), native_arch): b["Version"]
            for b in _colon_blocks(text) if "Name" in b and "Version" in b}


def parse_zypper_search(text, native_arch=None):
    """``zypper --xmlout search --match-exact --details NAME...``: ``{name: [every version]}``.

    Each ``<solvable kind="package" name=... edition=... arch=...>`` is one
    version in one repository (the installed one included).
    """
    import xml.etree.ElementTree as ElementTree

    start = text.find("<")
    versions = {}
    if start < 0:
        return versions
    for solvable in ElementTree.fromstring(text[start:]).iter("solvable"):
        if solvable.get("kind", "package") == "package" and solvable.get("name"):
            name = _rpm_name(solvable.get("name"), solvable.get("arch"), native_arch)
            versions.setdefault(name, []).append(_strip_zero_epoch(solvable.get("edition", "")))
    return versions


def parse_brew_list(text):
    """``brew list --versions``: ``name version [version...]`` per line."""
    installed = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            installed[fields[0]] = ", ".join(fields[1:])
    return installed


def parse_brew_info(text):
    """``brew info --json=v2 NAME...``: stable version of each formula and cask."""
    import json

    data = json.loads(text or "{}")
    candidates = {}
    for formula in data.get("formulae", []):
        version = formula.get("versions", {}).get("stable")
        if version and formula.get("revision"):
            version = "%s_%d" % (version, formula["revision"])
        candidates[formula["name"]] = version
    for cask in data.get("casks", []):
        candidates[cask["token"]] = cask.get("version")
    return candidates


# -- backends ----------------------------------------------------------------


class Backend(object):
    """One package manager.  Subclasses set the commands and parsers."""

    name = None
    env = {}
    installed_argv = ()
    parse_installed = None
    candidates_argv = ()
    parse_candidates = None
    versions_argv = ()
    parse_versions = None
    supports_pins = True
    cache_dirs = ()
    # The command that prints the host's architecture, for a manager that
    # names packages of another one with it (libc6:i386, glibc.i686): its
    # parsers then take that architecture, and drop it from native names.
    native_arch_argv = ()
    _native_arch = None

    def run(self, argv, ok_codes=(0,)):
        return _text(list(argv), self.env, ok_codes)

    def native_arch(self):
        """The host's architecture, asked once; None for a manager that does not name it."""
        if self._native_arch is None and self.native_arch_argv:
            self._native_arch = self.run(self.native_arch_argv).strip()
        return self._native_arch

    def _parsed(self, parse, text):
        return parse(text, self.native_arch()) if self.native_arch_argv else parse(text)

    def canonical(self, name):
        """The name :meth:`installed` reports for the package the user named ``name``."""
        return name

    def installed(self):
        """``{name: version}`` of every installed package."""
        return self._parsed(type(self).parse_installed, self.run(self.installed_argv))

    def _query(self, argv, names):
        # An unknown name makes some managers exit 1 while still listing the others.
        return self.run(list(argv) + list(names), ok_codes=(0, 1))

    def candidates(self, names):
        """``{name: version}`` that installing or upgrading would bring; unknown names are absent."""
        if not names:
            return {}
        return self._parsed(type(self).parse_candidates, self._query(self.candidates_argv, names))

    def versions(self, names):
        """``{name: [versions]}`` a pin may choose from; unknown names are absent."""
        if not names:
            return {}
        return self._parsed(type(self).parse_versions, self._query(self.versions_argv, names))

    def pin_matches(self, pin, version):
        """Whether ``'name=pin'`` asks for ``version``."""
        return pin == version

    def pin(self, name, version):
        return "%s=%s" % (name, version)

    def specs(self, specs):
        if not self.supports_pins and any(version for _, version in specs):
            raise PackageError("%s cannot install a chosen version (asked for %s); name the "
                               "package without '=version'" % (self.name, ", ".join(
                                   "%s=%s" % s for s in specs if s[1])))
        return [self.pin(n, v) if v else n for n, v in specs]

    def install_argv(self, specs):
        raise NotImplementedError

    def upgrade_argv(self, names):
        raise NotImplementedError

    def remove_argv(self, names):
        raise NotImplementedError

    def refresh_argv(self):
        raise NotImplementedError

    def execute(self, argv):
        self.run(argv)

    def _cache_files(self):
        for top in self.cache_dirs:
            for dirpath, _, filenames in os.walk(top):
                for filename in filenames:
                    path = os.path.join(dirpath, filename)
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    yield path, st

    def cache_fingerprint(self):
        """Changes exactly when the refreshed metadata changed."""
        return sorted((path, st.st_size, st.st_mtime) for path, st in self._cache_files()
                      if not path.endswith(("/lock", ".lock")))

    def cache_age(self):
        """Seconds since the package metadata was last refreshed; ``None`` if never."""
        mtimes = [st.st_mtime for _, st in self._cache_files()]
        return time.time() - max(mtimes) if mtimes else None

    def refreshed(self):
        """Called after a successful refresh."""


class Apt(Backend):
    name = "apt"
    env = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none"}
    installed_argv = ("dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${binary:Package}\t${Version}\n")
    parse_installed = parse_dpkg_query
    candidates_argv = ("apt-cache", "policy")
    parse_candidates = parse_apt_cache_policy
    versions_argv = candidates_argv
    parse_versions = parse_apt_cache_versions
    cache_dirs = ("/var/lib/apt/lists",)
    stamp = "/var/lib/apt/periodic/update-success-stamp"
    _apt_get = ("apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300",
                "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold")

    native_arch_argv = ("dpkg", "--print-architecture")

    def canonical(self, name):
        # 'libc6:amd64' (and apt's 'libc6:native') is 'libc6' on amd64; 'libc6:i386' stays
        return _without_arch(name, ":", self.native_arch(), ("native",)) if ":" in name else name

    def install_argv(self, specs):
        pinned = ["--allow-downgrades"] if any(v for _, v in specs) else []
        return list(self._apt_get) + ["install"] + pinned + self.specs(specs)

    def upgrade_argv(self, names):
        return list(self._apt_get) + ["install", "--only-upgrade"] + list(names)

    def remove_argv(self, names):
        return list(self._apt_get) + ["remove"] + list(names)

    def refresh_argv(self):
        return ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300", "update"]

    def cache_age(self):
        # An update that fetched nothing new leaves the lists untouched: the
        # stamp (the convention of apt's periodic jobs) records that it ran.
        try:
            return time.time() - os.stat(self.stamp).st_mtime
        except OSError:
            return Backend.cache_age(self)

    def refreshed(self):
        directory = os.path.dirname(self.stamp)
        if not os.path.isdir(directory):
            os.makedirs(directory)
        with open(self.stamp, "a"):
            os.utime(self.stamp, None)


def _rpm_pin_forms(version):
    """What a pin may say for an rpm ``[epoch:]version-release``: all of it, or less."""
    version = _strip_zero_epoch(version)
    epoch, _, version_release = version.rpartition(":")
    upstream = version_release.rsplit("-", 1)[0]
    forms = {version, version_release, upstream}
    if epoch:
        forms.add("%s:%s" % (epoch, upstream))
    return forms


class RpmBackend(Backend):
    """What dnf, yum and zypper share: rpm's database, ``name.arch`` names, rpm versions."""

    installed_argv = ("rpm", "-qa", "--qf", "%{NAME}\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\t%{ARCH}\n")
    parse_installed = parse_rpm_query
    native_arch_argv = ("rpm", "--eval", "%{_arch}")

    def canonical(self, name):
        # 'glibc.x86_64' and 'tzdata.noarch' are 'glibc' and 'tzdata' on x86_64; 'glibc.i686' stays
        return _without_arch(name, ".", self.native_arch(), _RPM_PLAIN_ARCHS) if "." in name else name

    def pin_matches(self, pin, version):
        # dnf and zypper take 'hello-2.12.1' / 'hello=2.12.1' for any release of 2.12.1
        return _strip_zero_epoch(pin) in _rpm_pin_forms(version)


class Dnf(RpmBackend):
    name = "dnf"
    candidates_argv = ("dnf", "-q", "list", "--available")
    parse_candidates = parse_yum_list
    versions_argv = ("dnf", "-q", "list", "--available", "--showduplicates")
    parse_versions = parse_yum_versions
    cache_dirs = ("/var/cache/dnf",)

    def pin(self, name, version):
        # dnf reads name-version[-release][.arch]: a foreign arch goes last
        base, _, arch = name.rpartition(".")
        if base and arch in _RPM_ARCHS:
            return "%s-%s.%s" % (base, version, arch)
        return "%s-%s" % (name, version)

    def install_argv(self, specs):
        return [self.name, "-y", "-q", "install"] + self.specs(specs)

    def upgrade_argv(self, names):
        return [self.name, "-y", "-q", "upgrade"] + list(names)

    def remove_argv(self, names):
        return [self.name, "-y", "-q", "remove"] + list(names)

    def refresh_argv(self):
        return [self.name, "-y", "-q", "makecache"]


class Yum(Dnf):
    name = "yum"
    candidates_argv = ("yum", "-q", "list", "available")
    versions_argv = ("yum", "-q", "list", "available", "--showduplicates")
    cache_dirs = ("/var/cache/yum",)

    def upgrade_argv(self, names):
        return ["yum", "-y", "-q", "update"] + list(names)


class Zypper(RpmBackend):
    name = "zypper"
    candidates_argv = ("zypper", "--non-interactive", "info")
    parse_candidates = parse_zypper_info
    versions_argv = ("zypper", "--non-interactive", "--xmlout", "search", "--match-exact", "--details")
    parse_versions = parse_zypper_search
    cache_dirs = ("/var/cache/zypp/raw",)
    _zypper = ("zypper", "--non-interactive")

    def candidates(self, names):
        found = Backend.candidates(self, names)
        return {name: version for name, version in found.items() if name in names}

    def versions(self, names):
        # zypper search matches package names: 'glibc.i686' is found by searching 'glibc'
        terms = set(names) | set(n.rpartition(".")[0] for n in names if "." in n)
        found = Backend.versions(self, sorted(terms))
        return {name: found_versions for name, found_versions in found.items() if name in names}

    def install_argv(self, specs):
        return list(self._zypper) + ["install", "--auto-agree-with-licenses"] + self.specs(specs)

    def upgrade_argv(self, names):
        return list(self._zypper) + ["update", "--auto-agree-with-licenses"] + list(names)

    def remove_argv(self, names):
        return list(self._zypper) + ["remove"] + list(names)

    def refresh_argv(self):
        return list(self._zypper) + ["refresh"]


class Apk(Backend):
    name = "apk"
    installed_argv = ("apk", "info", "-v")
    parse_installed = parse_apk_info
    candidates_argv = ("apk", "list")
    parse_candidates = parse_apk_list
    versions_argv = candidates_argv
    parse_versions = parse_apk_versions
    cache_dirs = ("/var/cache/apk",)

    def candidates(self, names):
        found = Backend.candidates(self, names)  # `apk list` matches globs: keep exact names
        return {name: version for name, version in found.items() if name in names}

    def versions(self, names):
        found = Backend.versions(self, names)
        return {name: versions for name, versions in found.items() if name in names}

    def install_argv(self, specs):
        return ["apk", "add", "--no-progress"] + self.specs(specs)

    def upgrade_argv(self, names):
        return ["apk", "add", "--no-progress", "--upgrade"] + list(names)

    def remove_argv(self, names):
        return ["apk", "del", "--no-progress"] + list(names)

    def refresh_argv(self):
        return ["apk", "update", "--no-progress"]


class Pacman(Backend):
    name = "pacman"
    installed_argv = ("pacman", "-Q")
    parse_installed = parse_pacman_query
    candidates_argv = ("pacman", "-Si")
    parse_candidates = parse_pacman_info
    supports_pins = False
    cache_dirs = ("/var/lib/pacman/sync",)

    def install_argv(self, specs):
        return ["pacman", "-S", "--noconfirm", "--needed"] + self.specs(specs)

    def upgrade_argv(self, names):
        return ["pacman", "-S", "--noconfirm", "--needed"] + list(names)

    def remove_argv(self, names):
        return ["pacman", "-R", "--noconfirm"] + list(names)

    def refresh_argv(self):
        return ["pacman", "-Sy", "--noconfirm"]


class Brew(Backend):
    name = "brew"
    env = {"HOMEBREW_NO_AUTO_UPDATE": "1", "HOMEBREW_NO_ENV_HINTS": "1"}
    installed_argv = ("brew", "list", "--versions")
    parse_installed = parse_brew_list
    candidates_argv = ("brew", "info", "--json=v2")
    parse_candidates = parse_brew_info
    supports_pins = False

    @property
    def cache_dirs(self):
        return (os.path.join(self.run(["brew", "--cache"]).strip(), "api"),)

    def install_argv(self, specs):
        return ["brew", "install"] + self.specs(specs)

    def upgrade_argv(self, names):
        return ["brew", "upgrade"] + list(names)

    def remove_argv(self, names):
        return ["brew", "uninstall"] + list(names)

    def refresh_argv(self):
        return ["brew", "update"]


BACKENDS = {backend.name: backend for backend in (Apt, Dnf, Yum, Zypper, Apk, Pacman, Brew)}


def get_backend(manager=None):
    """The backend named ``manager``, or the host's own package manager."""
    name = manager or package_manager()
    if name is None:
        raise PackageError("no supported package manager on this host (chopsticks-pkg knows %s)"
                           % ", ".join(sorted(BACKENDS)))
    if name not in BACKENDS:
        raise PackageError("unknown package manager %r: chopsticks-pkg knows %s"
                           % (name, ", ".join(sorted(BACKENDS))))
    return BACKENDS[name]()

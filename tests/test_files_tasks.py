"""chopsticks-files: the file, directory, line and link tasks, for real.

Every task runs on a real host process: ``Local()`` (this test runs as root)
and ``Sudo(sudo_user)`` (an unprivileged account), on real directories.
Each task is checked for: check mode changing nothing, a second run
reporting ``changed: False``, bad input raising an error that names the
host, the task, the argument and the path, and (file, line) atomic writes.
"""
import ast
import hashlib
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # CI installs the plugins (.ci/run); elsewhere they may be missing
    pytest.importorskip("chopsticks_files", reason="pip install -e plugins/chopsticks-files")

import chopsticks_files
from chopsticks import Local, RemoteException, Sudo, tasks
from chopsticks_files import directory, file, line, link, render, upload
from chopsticks_files.tasks import file_by_digest, file_from_stream
from files_tasks_deploy import deploy_site, python_version
from killed_controller import kill_controller_mid_write, leftovers

SRC = Path(chopsticks_files.__file__).resolve().parent
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owner changes)")


@pytest.fixture(scope="module")
def host():
    with Local() as tunnel:
        yield tunnel


@pytest.fixture(scope="module")
def user_host(sudo_user):
    with Sudo(sudo_user) as tunnel:
        yield tunnel


@pytest.fixture
def user_dir(sudo_user):
    """A directory the unprivileged user owns (tmp_path is root's, mode 0700)."""
    path = tempfile.mkdtemp(prefix="chopsticks-files-")
    entry = pwd.getpwnam(sudo_user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    yield Path(path)
    shutil.rmtree(path)


def snapshot(root):
    """Everything a task could change below root: names, contents, modes, owners, links."""
    found = {}
    for path in sorted(Path(root).rglob("*")) + [Path(root)]:
        st = path.lstat()
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_dir():
            found[str(path)] = ("dir", st.st_mode, st.st_uid, st.st_gid)
        else:
            found[str(path)] = ("file", path.read_bytes(), st.st_mode, st.st_uid, st.st_gid)
    return found


def raises_remote(tunnel, fn, *args, **kwargs):
    with pytest.raises(RemoteException) as info:
        tunnel.call(fn, *args, **kwargs)
    assert info.value.type_name.endswith("FileTaskError"), info.value
    assert info.value.host == tunnel.host
    text = str(info.value)
    assert text.startswith("[%s] " % tunnel.host)
    return info.value.msg


# -- the distribution ------------------------------------------------------------------------


def test_tasks_are_registered():
    for name in ("file", "directory", "line", "link"):
        assert getattr(tasks, name) is getattr(chopsticks_files, name)
    from chopsticks.tasks import file as imported
    assert imported is chopsticks_files.file


def test_list_plugins_lists_the_distribution():
    out = subprocess.run([sys.executable, "-m", "chopsticks.cli", "list-plugins"],
                         capture_output=True, text=True, check=True).stdout
    assert "files  chopsticks-files 2.0.0  ok\n    tasks: directory, file, line, link" in out


def test_host_modules_are_python36_syntax():
    for name in ("__init__.py", "tasks.py", "upload.py"):
        path = SRC / name
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 6))


def test_host_side_imports_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import chopsticks_files; "
            "print(sorted(m.split('.')[0] for m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, %r); %s"
                          % (str(SRC.parent), code)], capture_output=True, text=True, check=True)
    imported = set(ast.literal_eval(out.stdout)) - {"chopsticks_files"}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


# -- file --------------------------------------------------------------------------------------


def test_file_creates_then_reports_unchanged(host, tmp_path):
    target = tmp_path / "motd"
    result = host.call(file, str(target), "hello\n", mode="0640")
    assert result["changed"] is True and result["check"] is False
    assert result["changed_attributes"] == ["state", "content"]
    assert "+hello\n" in result["diff"]
    assert target.read_text() == "hello\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    again = host.call(file, str(target), "hello\n", mode=0o640)
    assert again["changed"] is False and again["changed_attributes"] == [] and again["diff"] == ""


def test_file_check_mode_changes_nothing_and_reports_the_plan(host, tmp_path):
    target = tmp_path / "conf"
    target.write_text("a = 1\nb = 2\n")
    target.chmod(0o600)
    before = snapshot(tmp_path)
    result = host.call(file, str(target), "a = 1\nb = 3\n", mode="0644", check=True)
    assert snapshot(tmp_path) == before
    assert result["changed"] is True and result["check"] is True
    assert result["changed_attributes"] == ["content", "mode"]
    assert result["before"]["mode"] == "0600" and result["after"]["mode"] == "0644"
    assert result["diff"] == ("--- before: %s\n+++ after: %s\n@@ -1,2 +1,2 @@\n a = 1\n-b = 2\n+b = 3\n"
                              % (target, target))
    # a new file in check mode: planned, not created
    result = host.call(file, str(tmp_path / "new"), "x", check=True)
    assert result["changed"] is True and not (tmp_path / "new").exists()
    # the real run matches the plan
    real = host.call(file, str(target), "a = 1\nb = 3\n", mode="0644")
    assert real["changed_attributes"] == ["content", "mode"]


def test_file_attributes_only_keeps_content(host, tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"keep")
    result = host.call(file, str(target), mode=0o600)
    assert result["changed_attributes"] == ["mode"] and result["diff"] == ""
    assert target.read_bytes() == b"keep" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert host.call(file, str(target), mode=0o600)["changed"] is False


@ROOT_ONLY
def test_file_owner_and_group_by_name_and_id(host, tmp_path, sudo_user):
    entry = pwd.getpwnam(sudo_user)
    target = tmp_path / "owned"
    result = host.call(file, str(target), "x", owner=sudo_user, group=entry.pw_gid)
    assert (target.stat().st_uid, target.stat().st_gid) == (entry.pw_uid, entry.pw_gid)
    assert result["changed"] is True
    assert host.call(file, str(target), "x", owner=entry.pw_uid, group=str(entry.pw_gid))["changed"] is False
    result = host.call(file, str(target), "y", owner="root", check=True)
    assert result["changed_attributes"] == ["content", "owner"]
    assert result["before"]["owner"] == sudo_user and result["after"]["owner"] == "root"
    assert target.stat().st_uid == entry.pw_uid and target.read_text() == "x"
    # replacing the content keeps the owner, group and mode not given
    target.chmod(0o604)
    host.call(file, str(target), "z")
    st = target.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (entry.pw_uid, entry.pw_gid, 0o604)


def test_file_absent(host, tmp_path):
    target = tmp_path / "gone"
    target.write_text("bye\n")
    result = host.call(file, str(target), state="absent", check=True)
    assert result["changed"] is True and target.exists() and "-bye\n" in result["diff"]
    result = host.call(file, str(target), state="absent")
    assert result["changed"] is True and result["changed_attributes"] == ["state"]
    assert not target.exists()
    assert host.call(file, str(target), state="absent")["changed"] is False


def test_file_backup_keeps_a_timestamped_copy(host, tmp_path):
    target = tmp_path / "hosts"
    target.write_text("old\n")
    target.chmod(0o640)
    result = host.call(file, str(target), "new\n", backup=True)
    backup = Path(result["backup"])
    assert backup.parent == tmp_path and backup.name.startswith("hosts.") and backup.name.endswith("~")
    assert backup.read_text() == "old\n" and stat.S_IMODE(backup.stat().st_mode) == 0o640
    assert target.read_text() == "new\n"
    # nothing to back up when nothing changes
    assert host.call(file, str(target), "new\n", backup=True)["backup"] is None


def test_file_writes_through_a_symlink(host, tmp_path):
    (tmp_path / "real").write_text("a\n")
    (tmp_path / "alias").symlink_to("real")
    result = host.call(file, str(tmp_path / "alias"), "b\n")
    assert result["path"] == str(tmp_path / "real")
    assert (tmp_path / "alias").is_symlink() and (tmp_path / "real").read_text() == "b\n"


def test_file_diff_notes_binary_and_large_content(host, tmp_path):
    target = tmp_path / "blob"
    target.write_bytes(b"\x00\x01")
    result = host.call(file, str(target), b"\x00\x02")
    assert result["diff"] == "binary content of %s: 2 bytes -> 2 bytes\n" % target
    big = b"line\n" * (chopsticks_files.DIFF_LIMIT // 5 + 1)
    result = host.call(file, str(target), big, check=True)
    assert "not diffed" in result["diff"] and len(result["diff"]) < 200


def test_file_bad_input_names_host_task_argument_and_path(host, tmp_path):
    missing = str(tmp_path / "no" / "such" / "file")
    msg = raises_remote(host, file, missing, "x")
    assert msg.startswith("file(path=%r)" % missing) and "parent directory" in msg
    target = str(tmp_path / "f")
    msg = raises_remote(host, file, target, "x", owner="no-such-user-xyz")
    assert msg == "file(path=%r): owner='no-such-user-xyz': no such user on this host" % target
    msg = raises_remote(host, file, target, "x", group="no-such-group-xyz")
    assert "group='no-such-group-xyz'" in msg and target in msg
    msg = raises_remote(host, file, target, "x", mode="u+rw")
    assert "mode='u+rw'" in msg and "symbolic" in msg
    msg = raises_remote(host, file, str(tmp_path), "x")
    assert "is a directory" in msg and str(tmp_path) in msg
    msg = raises_remote(host, file, "relative/path", "x")
    assert "path must be absolute" in msg
    msg = raises_remote(host, file, target, 42)
    assert "content must be str or bytes, not int" in msg
    msg = raises_remote(host, file, target, "x", state="gone")
    assert "state='gone'" in msg
    assert list(tmp_path.iterdir()) == []  # refused before anything changed


def test_file_failed_write_keeps_the_old_file_and_no_temp(user_host, user_dir):
    """A real failure half way: the unprivileged user may write the content
    but not give the file to root; the temp file goes, the old file stays."""
    target = user_dir / "conf"
    user_host.call(file, str(target), "old\n")
    before = snapshot(user_dir)
    with pytest.raises(RemoteException) as info:
        user_host.call(file, str(target), "new\n", owner="root")
    text = str(info.value)
    assert text.startswith("[%s] " % user_host.host)
    assert str(target) in text and "Operation not permitted" in text
    assert snapshot(user_dir) == before


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB filesystem (tmpfs), to fill up."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + done.stderr.strip())
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_file_disk_full_keeps_the_old_file_and_no_temp(host, small_disk):
    target = small_disk / "conf"
    target.write_text("old\n")
    before = snapshot(small_disk)
    with pytest.raises(RemoteException) as info:
        host.call(file, str(target), b"x" * (256 << 10))
    assert "file(path=%r)" % str(target) in str(info.value)
    assert "No space left on device" in str(info.value)
    assert snapshot(small_disk) == before


def test_file_damaged_stream_keeps_the_old_file_and_no_temp(host, tmp_path):
    target = tmp_path / "big"
    target.write_bytes(b"old")
    before = snapshot(tmp_path)
    data = b"x" * 3000
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(RemoteException, match="arrived damaged"):
        host.call_stream(file_from_stream, iter([data[:1000], data[1000:]]), str(target), wrong,
                         len(data))
    assert snapshot(tmp_path) == before


# -- through sudo, as an unprivileged user ---------------------------------------------------


def test_unprivileged_user_writes_its_own_files(user_host, user_dir, sudo_user):
    target = user_dir / "mine"
    result = user_host.call(file, str(target), "x\n", mode=0o600)
    assert result["changed"] is True
    assert pwd.getpwuid(target.stat().st_uid).pw_name == sudo_user
    assert user_host.call(file, str(target), "x\n", mode=0o600)["changed"] is False


def test_permission_denied_names_host_and_path(user_host, tmp_path):
    # tmp_path belongs to root, mode 0700
    target = str(tmp_path / "denied")
    with pytest.raises(RemoteException) as info:
        user_host.call(file, target, "x")
    text = str(info.value)
    assert text.startswith("[%s] " % user_host.host), text
    assert "file(path=%r)" % target in text and "Permission denied" in text
    assert "as user" in text
    with pytest.raises(RemoteException, match=r"directory\(path='/root/chopsticks-x'\).*Permission denied"):
        user_host.call(directory, "/root/chopsticks-x")


def test_unprivileged_owner_change_is_refused_clearly(user_host, user_dir):
    target = user_dir / "mine"
    target.write_text("x")
    os.chown(target, user_dir.stat().st_uid, user_dir.stat().st_gid)
    before = snapshot(user_dir)
    plan = user_host.call(file, str(target), owner="root", check=True)
    assert plan["changed_attributes"] == ["owner"]  # the plan does not know it will be refused
    with pytest.raises(RemoteException) as info:
        user_host.call(file, str(target), owner="root")
    text = str(info.value)
    assert text.startswith("[%s] " % user_host.host)
    assert "cannot change the owner, group or mode of %s" % target in text
    assert "Operation not permitted" in text
    assert snapshot(user_dir) == before


# -- line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, kwargs, expected", [
    # match: the LAST matching line is replaced, the others stay (Ansible's regexp)
    ("a=1\nb=2\na=3\n", dict(line="a=9", match="^a="), "a=1\nb=2\na=9\n"),
    # no match: appended; a missing final newline is added first
    ("b=2", dict(line="a=9", match="^a="), "b=2\na=9\n"),
    # no match but the line is there already: unchanged (no duplicate)
    ("a=9\n", dict(line="a=9", match="^A="), "a=9\n"),
    # without match: exact line present -> unchanged, else appended
    ("x\ny\n", dict(line="y"), "x\ny\n"),
    ("x\n", dict(line="y"), "x\ny\n"),
    # after: inserted after the last line it finds; EOF or no hit: appended
    ("[a]\nk=1\n[b]\nk=2\n", dict(line="new=1", after=r"^\[a\]"), "[a]\nnew=1\nk=1\n[b]\nk=2\n"),
    ("x\n", dict(line="new", after="^nomatch"), "x\nnew\n"),
    ("x\n", dict(line="new", after="EOF"), "x\nnew\n"),
    # CRLF files stay CRLF
    ("a=1\r\nb=2\r\n", dict(line="a=2", match="^a="), "a=2\r\nb=2\r\n"),
    ("a=1\r\n", dict(line="c=3"), "a=1\r\nc=3\r\n"),
    # absent: every matching line, or every line equal to `line`
    ("a=1\nb=2\na=3\n", dict(line="", match="^a=", state="absent"), "b=2\n"),
    ("x\ny\nx\n", dict(line="x", state="absent"), "y\n"),
])
def test_line_follows_lineinfile(host, tmp_path, content, kwargs, expected):
    target = tmp_path / "f"
    target.write_bytes(content.encode())
    target.chmod(0o640)
    kwargs = dict(kwargs)
    text = kwargs.pop("line")
    plan = host.call(line, str(target), text, check=True, **kwargs)
    assert target.read_bytes() == content.encode()
    result = host.call(line, str(target), text, **kwargs)
    assert target.read_bytes() == expected.encode()
    assert result["changed"] is plan["changed"] is (content != expected)
    assert plan["diff"] == result["diff"]
    assert host.call(line, str(target), text, **kwargs)["changed"] is False
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_line_missing_file(host, tmp_path):
    target = str(tmp_path / "new")
    msg = raises_remote(host, line, target, "x=1")
    assert msg.startswith("line(path=%r): " % target) and "create=True" in msg
    assert host.call(line, target, "x=1", state="absent")["changed"] is False
    assert host.call(line, target, "x=1", create=True, check=True)["changed"] is True
    assert not os.path.exists(target)
    result = host.call(line, target, "x=1", create=True)
    assert result["changed"] is True and Path(target).read_text() == "x=1\n"
    assert host.call(line, target, "x=1", create=True)["changed"] is False


def test_line_bad_input(host, tmp_path):
    target = tmp_path / "f"
    target.write_text("a\n")
    msg = raises_remote(host, line, str(target), "x", match="(unclosed")
    assert "match='(unclosed' is not a regular expression" in msg and str(target) in msg
    msg = raises_remote(host, line, str(target), "x", after="[")
    assert "after='['" in msg
    msg = raises_remote(host, line, str(target), "two\nlines")
    assert "line=" in msg and "one line" in msg
    msg = raises_remote(host, line, str(tmp_path), "x")
    assert "is a directory" in msg
    assert target.read_text() == "a\n"


# -- directory ---------------------------------------------------------------------------------


def test_directory_creates_with_parents(host, tmp_path):
    target = tmp_path / "a" / "b"
    plan = host.call(directory, str(target), mode="0750", check=True)
    assert plan["changed"] is True and not (tmp_path / "a").exists()
    result = host.call(directory, str(target), mode="0750")
    assert result["created"] == [str(tmp_path / "a"), str(target)]
    assert target.is_dir() and stat.S_IMODE(target.stat().st_mode) == 0o750
    assert host.call(directory, str(target), mode="0750")["changed"] is False


@ROOT_ONLY
def test_directory_owner_and_recurse(host, tmp_path, sudo_user):
    entry = pwd.getpwnam(sudo_user)
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "plain").write_text("p")
    (root / "sub" / "plain").chmod(0o600)
    (root / "tool").write_text("t")
    (root / "tool").chmod(0o700)
    before = snapshot(tmp_path)
    plan = host.call(directory, str(root), owner=sudo_user, mode=0o755, recurse=True, check=True)
    assert snapshot(tmp_path) == before
    assert plan["changed"] is True and plan["changed_paths_count"] == 3
    result = host.call(directory, str(root), owner=sudo_user, mode=0o755, recurse=True)
    assert result["changed_paths_count"] == 3 and result["changed_attributes"] == ["owner"]
    for path in (root, root / "sub", root / "sub" / "plain", root / "tool"):
        assert path.stat().st_uid == entry.pw_uid
    # X semantics: files keep execute bits only if they had one
    assert stat.S_IMODE((root / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "sub" / "plain").stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "tool").stat().st_mode) == 0o755
    again = host.call(directory, str(root), owner=sudo_user, mode=0o755, recurse=True)
    assert again["changed"] is False and again["changed_paths"] == []


def test_directory_absent(host, tmp_path):
    root = tmp_path / "d"
    (root / "x").mkdir(parents=True)
    (root / "x" / "f").write_text("f")
    assert host.call(directory, str(root), state="absent", check=True)["changed"] is True
    assert (root / "x" / "f").exists()
    assert host.call(directory, str(root), state="absent")["changed"] is True
    assert not root.exists()
    assert host.call(directory, str(root), state="absent")["changed"] is False


def test_directory_bad_input(host, tmp_path):
    (tmp_path / "f").write_text("f")
    msg = raises_remote(host, directory, str(tmp_path / "f"))
    assert msg == "directory(path=%r): %s is a regular file, not a directory" % (
        str(tmp_path / "f"), tmp_path / "f")
    msg = raises_remote(host, directory, str(tmp_path / "f" / "below"))
    assert "is not a directory" in msg
    msg = raises_remote(host, directory, str(tmp_path / "d"), owner="no-such-user-xyz")
    assert "owner='no-such-user-xyz'" in msg
    msg = raises_remote(host, directory, str(tmp_path / "f"), state="absent")
    assert "not a directory" in msg
    assert (tmp_path / "f").read_text() == "f" and not (tmp_path / "d").exists()


# -- link -----------------------------------------------------------------------------------------


def test_link_creates_retargets_and_removes(host, tmp_path):
    path = tmp_path / "current"
    plan = host.call(link, str(path), "releases/1", check=True)
    assert plan["changed"] is True and not os.path.lexists(path)
    result = host.call(link, str(path), "releases/1")
    assert result["changed"] is True and os.readlink(path) == "releases/1"
    assert host.call(link, str(path), "releases/1")["changed"] is False
    plan = host.call(link, str(path), "releases/2", check=True)
    assert plan["before"] == {"target": "releases/1"} and plan["after"] == {"target": "releases/2"}
    assert os.readlink(path) == "releases/1"
    result = host.call(link, str(path), "releases/2")
    assert result["changed_attributes"] == ["target"] and os.readlink(path) == "releases/2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current"]  # no temp link left
    assert host.call(link, str(path), "releases/2", state="absent", check=True)["changed"] is True
    assert os.path.islink(path)
    assert host.call(link, str(path), "releases/2", state="absent")["changed"] is True
    assert not os.path.lexists(path)
    assert host.call(link, str(path), "releases/2", state="absent")["changed"] is False


def test_link_bad_input(host, tmp_path):
    (tmp_path / "file").write_text("f")
    msg = raises_remote(host, link, str(tmp_path / "file"), "elsewhere")
    assert "is a regular file, not a symlink" in msg and str(tmp_path / "file") in msg
    msg = raises_remote(host, link, str(tmp_path / "no" / "l"), "x")
    assert "parent directory" in msg
    msg = raises_remote(host, link, str(tmp_path / "l"), "")
    assert msg.startswith("link(path=%r): target=''" % str(tmp_path / "l"))


# -- temp files: names near NAME_MAX, and those a killed writer left ---------------------------

# 80 CJK characters are 240 bytes, a valid name (NAME_MAX is 255 bytes); 250
# bytes that are not UTF-8 arrive as a surrogate-escaped str, a character a byte.
LONG_NAMES = ["\u914d" * 80, os.fsdecode(b"\xff" * 250)]


@pytest.mark.parametrize("name", LONG_NAMES, ids=["cjk-240-bytes", "undecodable-250-bytes"])
def test_names_near_name_max_are_written(host, tmp_path, name):
    target = tmp_path / name
    assert host.call(file, str(target), "x\n")["changed"] is True
    assert host.call(line, str(target), "y")["changed"] is True
    assert target.read_text() == "x\ny\n"
    assert host.call(link, str(tmp_path / ("L" + name[1:])), "/etc/hostname")["changed"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "L" + name[1:]])


def test_a_killed_writers_temp_file_is_swept_by_the_next_write(host, tmp_path):
    """As put sweeps its own: a temp file that a dead process of this host left
    for the same file goes; a live process's, or another host's, stays."""
    from chopsticks import files_remote  # the same host tag names the same machine

    target = tmp_path / "conf"
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = files_remote._host_tag()
    stale = tmp_path / (".conf.chopsticks-%s-%d-0badf00d" % (tag, dead.pid))
    alive = tmp_path / (".conf.chopsticks-%s-%d-0badf00d" % (tag, os.getpid()))
    other_host = tmp_path / (".conf.chopsticks-zzzzzz-%d-0badf00d" % dead.pid)
    for path in (stale, alive, other_host):
        path.write_bytes(b"partial")
    host.call(file, str(target), "new\n")
    assert target.read_text() == "new\n"
    assert leftovers(tmp_path) == sorted([alive.name, other_host.name])


CONTROLLER_HANGS_MID_UPLOAD = r'''
import hashlib, sys, time
from chopsticks import Local
from chopsticks_files.tasks import file_from_stream
dest, flag = sys.argv[1:]
size = 64 << 20

def chunks():  # like upload(): the content streams; the controller stalls half way
    for sent in range(0, size, 1 << 20):
        if sent == 32 << 20:
            open(flag, "w").close()
            time.sleep(3600)
        yield bytes(1 << 20)

Local().call_stream(file_from_stream, chunks(), dest,
                    hashlib.sha256(bytes(size)).hexdigest(), size)
'''


def test_a_controller_killed_mid_upload_leaves_no_temp_file_on_the_host(tmp_path):
    """The controller's process dies while it streams content to file(): the
    agent sees the hang-up and leaves at once, removing the temp file first."""
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    dest = dest_dir / "conf"
    dest.write_bytes(b"precious")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SRC.parent), str(Path(__file__).resolve().parent.parent)]
        + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    assert kill_controller_mid_write(tmp_path, CONTROLLER_HANGS_MID_UPLOAD, [dest], dest_dir, env) == []
    assert dest.read_bytes() == b"precious"


# -- large content: digest first, stream when big -----------------------------------------------


def test_upload_sends_content_only_when_the_host_lacks_it(host, tmp_path):
    target = tmp_path / "data"
    content = os.urandom(chopsticks_files.STREAM_THRESHOLD + 12345)  # streams
    result = upload(host, str(target), content, mode=0o600)
    assert result["changed"] is True and target.read_bytes() == content
    digest = hashlib.sha256(content).hexdigest()
    # the host has it: the digest alone settles the call (no content needed)
    answer = host.call(file_by_digest, str(target), digest, len(content), mode=0o600)
    assert answer["changed"] is False and "need_content" not in answer
    answer = host.call(file_by_digest, str(target), digest, len(content), mode=0o644)
    assert answer["changed_attributes"] == ["mode"]
    assert host.call(file_by_digest, str(target), "0" * 64, 5)["need_content"] is True
    assert upload(host, str(target), content, mode=0o644)["changed"] is False
    # check mode of a large change: planned without sending it, file untouched
    plan = upload(host, str(target), content[::-1], check=True)
    assert plan["changed_attributes"] == ["content"] and "not diffed" in plan["diff"]
    assert target.read_bytes() == content


def test_upload_from_a_local_file_and_small_content(host, tmp_path):
    source = tmp_path / "src"
    source.write_bytes(b"small\n")
    result = upload(host, str(tmp_path / "dst"), local_path=source)
    assert result["changed"] is True and (tmp_path / "dst").read_bytes() == b"small\n"
    plan = upload(host, str(tmp_path / "dst"), "small\nmore\n", check=True)
    assert "+more\n" in plan["diff"]  # small: sent for the diff


# -- templates, on the controller ---------------------------------------------------------------


def test_render_finds_templates_beside_the_caller_and_is_strict(tmp_path, monkeypatch):
    import jinja2
    (tmp_path / "motd.j2").write_text("Welcome to {{ name }}\n")
    (tmp_path / "deploy.py").write_text(
        "from chopsticks_files import render\n"
        "def motd(**kw):\n    return render('motd.j2', **kw)\n")
    spec = importlib.util.spec_from_file_location("deploy_for_render_test", tmp_path / "deploy.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    assert deploy.motd(name="web1") == "Welcome to web1\n"
    with pytest.raises(jinja2.UndefinedError, match="'name' is undefined"):
        deploy.motd()
    with pytest.raises(jinja2.TemplateNotFound, match="motd.j2' not found in .*search_path="):
        render("motd.j2", name="x")  # not beside this test module


def test_render_search_path_and_environment(tmp_path, monkeypatch):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "a.j2").write_text("{{ x }}-one")
    (tmp_path / "two" / "b.j2").write_text("{% for i in items %}{{ i }};{% endfor %}")
    assert render("a.j2", search_path=tmp_path / "one", x=1) == "1-one"
    monkeypatch.setenv("CHOPSTICKS_TEMPLATE_PATH", str(tmp_path / "two"))
    assert render("b.j2", items=[1, 2]) == "1;2;"


# -- a deployment is one function -------------------------------------------------------------


def test_a_deployment_is_one_call(host, tmp_path):
    root = str(tmp_path / "site")
    os.mkdir(root)
    plan = host.call(deploy_site, root, check=True)
    assert all(r["changed"] and r["check"] for r in plan.values())
    assert os.listdir(root) == []
    # etc/ does not exist yet: planned with a warning, not refused
    assert plan["conf"]["warning"].startswith("the parent directory %s/etc does not exist" % root)
    first = host.call(deploy_site, root)
    assert all(r["changed"] for r in first.values())
    assert Path(root, "etc", "app.conf").read_text() == "port = 80\n"
    second = host.call(deploy_site, root)
    assert not any(r["changed"] for r in second.values())


def test_tasks_run_on_the_oldest_python(pythons, tmp_path):
    """Python 3.6 hosts: the tasks, the digest check and the stream path."""
    oldest = min(pythons, key=lambda p: tuple(int(n) for n in p.rsplit("python", 1)[1].split(".")))
    root = str(tmp_path / "site")
    os.mkdir(root)
    with Local(python=oldest) as old_host:
        assert old_host.call(python_version) == (3, 6) or "3.6" not in oldest
        assert all(r["changed"] for r in old_host.call(deploy_site, root).values())
        assert not any(r["changed"] for r in old_host.call(deploy_site, root).values())
        content = b"z" * (chopsticks_files.STREAM_THRESHOLD + 1)
        assert upload(old_host, root + "/big", content)["changed"] is True
        assert upload(old_host, root + "/big", content)["changed"] is False
    assert Path(root, "big").read_bytes() == content


# -- the command line -------------------------------------------------------------------------------


def test_cli_run_check_diff_prints_the_diff(tmp_path):
    target = tmp_path / "motd"
    target.write_text("old\n")
    out = subprocess.run([sys.executable, "-m", "chopsticks.cli", "run", "local", "file",
                          str(target), "content=hello\n", "--check", "--diff"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("local  would change  path: %s" % target)
    assert lines[1:] == ["    --- before: %s" % target, "    +++ after: %s" % target,
                         "    @@ -1 +1 @@", "    -old", "    +hello"]
    assert target.read_text() == "old\n"
    out = subprocess.run([sys.executable, "-m", "chopsticks.cli", "run", "local", "file",
                          str(target), "content=hello\n", "--check"], capture_output=True, text=True)
    assert "---" not in out.stdout  # the diff only with --diff

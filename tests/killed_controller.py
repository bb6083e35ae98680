"""A controller killed in the middle of a write, for the tests of put
(test_files.py) and of the file tasks (test_files_tasks.py)."""
import os
import subprocess
import sys
import time


def leftovers(directory):
    """The temp files chopsticks left in ``directory``, sorted."""
    return sorted(n for n in os.listdir(directory) if '.chopsticks-' in n)


def kill_controller_mid_write(tmp_path, script, args, dest_dir, env=None):
    """Run the controller ``script`` (its text) in a new process, with
    ``args`` and a flag file's path last; once it created the flag (its write
    stalled) and its temp file is in ``dest_dir``, kill it, then wait (at
    most 30 s) for the host to remove the temp file.  Returns the temp files
    left."""
    path, flag = tmp_path / 'controller.py', tmp_path / 'stalled'
    path.write_text(script)
    controller = subprocess.Popen([sys.executable, str(path)] + [str(a) for a in args + [flag]],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (flag.exists() and leftovers(dest_dir)) and time.monotonic() < deadline:
            assert controller.poll() is None, controller.stderr.read()
            time.sleep(0.05)
        assert leftovers(dest_dir), 'the write never started its temp file'
        controller.kill()
        controller.wait(timeout=60)
        deadline = time.monotonic() + 30
        while leftovers(dest_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        return leftovers(dest_dir)
    finally:
        if controller.poll() is None:
            controller.kill()
        controller.wait()
        controller.stderr.close()

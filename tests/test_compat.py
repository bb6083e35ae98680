"""Code that runs on remote hosts must compile on the oldest Python we support (3.6)."""
import os
import subprocess

import pytest

from conftest import available_pythons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules a remote imports: the agent itself, and what relays and files pull in.
REMOTE_MODULES = ['__init__', 'agent', 'codec', 'wire', 'errors', 'tunnel', 'connection',
                  'broker', 'bootstrap', 'modserver', 'modfind', 'modscan', 'servepolicy',
                  'serialize', 'ssh', 'files', 'relay', 'group', 'queue', 'hookspecs', 'aio',
                  'connecting']


def test_remote_side_modules_compile_on_the_oldest_python():
    pythons = available_pythons()
    if not pythons:
        pytest.skip('no pyenv interpreters')
    oldest = pythons[0]
    paths = [os.path.join(ROOT, 'chopsticks', name + '.py') for name in REMOTE_MODULES]
    script = ('import sys\nfor p in sys.argv[1:]:\n'
              '    compile(open(p).read(), p, "exec")\n')
    out = subprocess.run([oldest, '-c', script] + paths, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

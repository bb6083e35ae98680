"""chopsticks-files: idempotent file tasks with check mode and diffs.

``file``, ``directory``, ``line`` and ``link`` run on the host (standard
library only, Python 3.6+): call them through a tunnel, or from your own
function running there, so that a whole deployment is one call::

    from chopsticks import Local
    from chopsticks_files import file, render

    Local().call(file, '/tmp/motd', render('motd.j2', name='web1'), mode='0644')

Two helpers stay on the controller: :func:`render` (Jinja2 templates) and
:func:`upload` (large content: sent only when the host lacks it, streamed
when it is big).  See README.rst for the reference.
"""
from chopsticks_files.tasks import DIFF_LIMIT, FileTaskError, directory, file, line, link
from chopsticks_files.upload import STREAM_THRESHOLD, upload

__version__ = "2.0.0"
__all__ = ["file", "directory", "line", "link", "render", "upload", "FileTaskError",
           "TASKS", "DIFF_LIMIT", "STREAM_THRESHOLD"]

#: The tasks the plugin registers, by name.
TASKS = {"file": file, "directory": directory, "line": line, "link": link}


def render(template, search_path=None, **variables):
    """Render the Jinja2 template file ``template`` with ``variables``; returns the text.

    Runs on the controller (Jinja2 is needed here only).  The template is
    looked for beside the module that calls ``render``, then in
    ``search_path`` (a directory or a list of them), then in the directories
    of the ``CHOPSTICKS_TEMPLATE_PATH`` environment variable (separated by
    ``os.pathsep``).  An undefined variable is an error, not an empty string
    (``StrictUndefined``); the template's trailing newline is kept.
    """
    import sys

    from chopsticks_files.templates import render_file
    return render_file(template, sys._getframe(1), search_path, variables)

"""Jinja2 templates, rendered on the controller for the file tasks."""
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import jinja2

#: Directories (separated by os.pathsep) searched after the caller's own.
TEMPLATE_PATH_ENV = "CHOPSTICKS_TEMPLATE_PATH"


def search_directories(caller_file: Optional[str],
                       search_path: Union[str, os.PathLike, Sequence[Any], None]) -> List[str]:
    """Where a template is looked for, in order: beside the caller, search_path, the env var."""
    directories = []
    if caller_file and not caller_file.startswith("<"):  # <stdin>, <string>: no directory
        directories.append(os.path.dirname(os.path.abspath(caller_file)))
    if isinstance(search_path, (str, os.PathLike)):
        search_path = [search_path]
    directories.extend(os.fspath(p) for p in search_path or ())
    directories.extend(p for p in os.environ.get(TEMPLATE_PATH_ENV, "").split(os.pathsep) if p)
    return directories


def render_file(template: str, caller_frame: Any, search_path: Any,
                variables: Dict[str, Any]) -> str:
    directories = search_directories(caller_frame.f_code.co_filename, search_path)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directories),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,  # a config file keeps its final newline
        autoescape=False,            # configuration files, not HTML
    )
    try:
        return environment.get_template(os.fspath(template)).render(**variables)
    except jinja2.TemplateNotFound as exc:
        raise jinja2.TemplateNotFound(
            exc.name, f"template {template!r} not found in {', '.join(directories) or '(nowhere)'}"
            f" (searched beside the caller, search_path= and ${TEMPLATE_PATH_ENV})") from None

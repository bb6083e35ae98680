"""Every progress bar chopsticks shows: one transfer's bytes, or a group's hosts.

Bars are drawn with ``rich`` on stderr, only when stderr is a terminal and
rich is installed (it is optional), and vanish when done.  rich allows one
live display per process, so all transfers share one bar display; a group's
bar is its own display (a group's transfers report to it instead).
"""
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

TRANSFER_THRESHOLD = 8 << 20  # smaller transfers never show a bar by themselves
GROUP_DELAY = 0.5             # seconds a group operation runs before it shows progress

# ``progress=`` of put/fetch/sync: None (a bar for big transfers on a terminal),
# False, True, or a callback(bytes_done, bytes_total).
ProgressSetting = Union[None, bool, Callable[[int, int], Any]]


def stderr_is_terminal() -> bool:
    import sys
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _rich_progress(*columns: Any) -> Any:
    """A started-later rich Progress on stderr; raises if rich is missing."""
    from rich.console import Console
    from rich.progress import Progress
    return Progress(*columns, console=Console(stderr=True), transient=True)


# --- one transfer's bytes -----------------------------------------------------------------

_bar_lock = threading.Lock()
_bar: Any = None
_bar_users = 0


class TransferProgress(object):
    """Bytes moved by one transfer, shown on the shared bar, given to a
    callback, or dropped."""

    def __init__(self, setting: ProgressSetting, description: str, total: int):
        self.total = total
        self.done = 0
        self.callback: Optional[Callable[[int, int], Any]] = None
        self.task: Any = None
        if setting is False or setting is None and (
                total <= TRANSFER_THRESHOLD or not stderr_is_terminal()):
            return
        if callable(setting) and setting is not True:
            self.callback = setting
            return
        self.task = _bar_add(description, total)

    def advance(self, n: int) -> None:
        self.done += n
        if self.task is not None:
            _bar.update(self.task, advance=n)
        elif self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.task is not None:
            _bar_remove(self.task)
            self.task = None


def _bar_add(description: str, total: int) -> Any:
    global _bar, _bar_users
    with _bar_lock:
        if _bar is None:
            try:
                from rich.progress import (BarColumn, DownloadColumn, TextColumn,
                                           TimeRemainingColumn, TransferSpeedColumn)
                bar = _rich_progress(TextColumn('{task.description}', markup=False), BarColumn(),
                                     DownloadColumn(), TransferSpeedColumn(),
                                     TimeRemainingColumn())
                bar.start()
            except Exception:  # no rich, or another live display is running
                return None
            _bar = bar
        _bar_users += 1
        return _bar.add_task(description, total=total)


def _bar_remove(task: Any) -> None:
    global _bar, _bar_users
    with _bar_lock:
        if _bar is None:
            return
        _bar.remove_task(task)
        _bar_users -= 1
        if _bar_users == 0:
            _bar.stop()
            _bar = None


# --- a group's hosts ----------------------------------------------------------------------

class GroupProgress(object):
    """A transient bar for a group operation that runs longer than
    GROUP_DELAY: hosts done, failures, and the bytes its transfers moved."""

    def __init__(self, what: str, enabled: bool):
        self.what = what or 'chopsticks'
        self.enabled = enabled
        self.start_at = time.monotonic() + GROUP_DELAY if enabled and stderr_is_terminal() else None
        self.bar: Any = None
        self.task: Any = None
        self.lock = threading.Lock()   # transfers report bytes from their own threads
        self.transfers: Dict[str, Tuple[int, int]] = {}
        self.done = 0
        self.failed = 0

    def starts_at(self) -> Optional[float]:
        return self.start_at if self.bar is None else None

    def reporter(self, host: str) -> ProgressSetting:
        """``progress=`` for one host's transfer."""
        if self.start_at is None:
            return None if self.enabled else False

        def report(done: int, total: int) -> None:
            with self.lock:
                self.transfers[host] = (done, total)
                if self.bar is not None:
                    self.bar.update(self.task, completed=self._completed(), detail=self._detail())
        return report

    def _completed(self) -> float:
        # Hosts done, plus the fractions of the transfers under way: the bar moves.
        return self.done + sum(d / t for d, t in self.transfers.values() if 0 < d < t)

    def _detail(self) -> str:
        parts = []
        if self.transfers:
            from rich.filesize import decimal
            done = sum(d for d, _ in self.transfers.values())
            total = sum(t for _, t in self.transfers.values())
            parts.append('%s/%s' % (decimal(done), decimal(total)))
        if self.failed:
            parts.append('[red]%d failed[/]' % self.failed)
        return '  '.join(parts)

    def update(self, done: int, total: int, failed: int) -> None:
        if self.start_at is None:
            return
        with self.lock:
            self.done = done
            self.failed = failed
            if self.bar is None:
                if time.monotonic() < self.start_at or done >= total:
                    return
                self._open(total)
                if self.bar is None:
                    return
            self.bar.update(self.task, completed=self._completed(), total=total,
                            detail=self._detail())

    def _open(self, total: int) -> None:
        try:
            from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)
            bar = _rich_progress(SpinnerColumn(), TextColumn('{task.description}'), BarColumn(),
                                 MofNCompleteColumn(), TextColumn('hosts'),
                                 TextColumn('{task.fields[detail]}'), TimeElapsedColumn())
            self.task = bar.add_task(self.what, total=total, detail='')
            bar.start()
        except Exception:  # no rich, or another live display is running
            self.start_at = None
            return
        self.bar = bar

    def close(self) -> None:
        with self.lock:
            bar, self.bar = self.bar, None
            self.start_at = None
        if bar is not None:
            bar.stop()

"""What a host prints and logs, shown on the controller.

Each connection has a ``RemoteOutput``: it keeps the tail of the agent's
stderr (for a ConnectError), splits what follows the agent's start mark into
lines prefixed with the host, and turns the agent's LOG frames into log
records on the controller's loggers.  One ``OutputRelay`` thread for the
process writes them, so a slow stderr never stalls the broker thread.
"""
import atexit
import collections
import logging
import re
import sys
import threading
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from . import wire
from .display import printable, printable_lines

STDERR_TAIL = 64 * 1024     # stderr kept for error messages
STDERR_LINE_MAX = 16 * 1024  # a longer line is shown in pieces
RELAY_BUFFER = 1 << 20      # remote output waiting for our stderr before lines are dropped
LOGGER_NAME_MAX = 200       # characters in a logger name a remote may use...
LOGGER_DEPTH_MAX = 8        # ...dotted parts in it (each part is a placeholder logger)...
LOGGER_NAMES_MAX = 1000     # ...how many new names all remotes together bring into being...
LOGGER_NAMES_PER_CONNECTION = 200  # ...and one connection of them (one host cannot take all)
REMOTE_LOGGER = 'chopsticks.remote'  # where records with other names go
# A record's fields, with the types a remote may give them (others are left out).
LOG_FIELDS: Dict[str, type] = {'name': str, 'levelno': int, 'msg': str, 'pathname': str, 'lineno': int,
              'funcName': str, 'created': float, 'threadName': str, 'process': int,
              'exc_text': str}
TEXT_FIELDS = ('pathname', 'funcName', 'threadName')  # shown by formatters that ask
STANDARD_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
_LOGGER_NAME = re.compile(r'[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\Z')


class OutputRelay(object):
    """Shows remote output (stderr lines, log records) from a thread of its own.

    The broker thread reads every tunnel: if it wrote to ``sys.stderr`` or ran
    logging handlers itself, a slow or blocked stderr (a full pipe, a paused
    terminal) would stall every tunnel.  Output waits here instead, at most
    RELAY_BUFFER bytes of it; past that, lines are dropped and a note says
    how many.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.queue: Deque[Tuple[Any, Optional[logging.LogRecord]]] = collections.deque()
        self.queued = 0  # bytes, roughly
        self.dropped: Dict[str, int] = {}  # host -> lines dropped since the last note
        self.busy = False
        self.thread: Optional[threading.Thread] = None

    def has_room(self) -> bool:
        return self.queued < RELAY_BUFFER

    def text(self, host: str, text: str, lines: int) -> None:
        """Show ``text``, ``lines`` whole lines already prefixed with the host."""
        self._put(host, len(text), lines, (text, None))

    def log(self, host: str, logger: logging.Logger, record: logging.LogRecord) -> None:
        """Have ``logger`` handle ``record``, on the relay's thread."""
        self._put(host, len(str(record.msg)) + 256, 1, (logger, record))

    def drop(self, host: str, lines: int) -> None:
        """Count ``lines`` lines of ``host`` as dropped (a note says so later)."""
        with self.cond:
            self.dropped[host] = self.dropped.get(host, 0) + lines

    def _put(self, host, cost, lines, item):
        with self.cond:
            if self.queued and self.queued + cost > RELAY_BUFFER:
                self.dropped[host] = self.dropped.get(host, 0) + lines
                return
            self.queue.append(item)
            self.queued += cost
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name='chopsticks-output',
                                               daemon=True)
                self.thread.start()
            self.cond.notify()

    def drain(self, timeout: Optional[float]) -> None:
        """Wait until everything queued so far was shown (at exit, say)."""
        with self.cond:
            self.cond.wait_for(lambda: not (self.queue or self.dropped or self.busy), timeout)

    def _run(self):
        while True:
            with self.cond:
                while not (self.queue or self.dropped):
                    self.busy = False
                    self.cond.notify_all()
                    self.cond.wait()
                self.busy = True
                items = list(self.queue)
                self.queue.clear()
                self.queued = 0
                dropped, self.dropped = self.dropped, {}
            texts = []
            for first, record in items:
                if record is None:
                    texts.append(first)
                    continue
                self._write(texts)
                try:
                    first.handle(record)
                except Exception:
                    pass
            texts.extend('[%s] chopsticks: %d lines of output dropped: this process\'s stderr '
                         'is not keeping up\n' % (host, n) for host, n in dropped.items())
            self._write(texts)

    @staticmethod
    def _write(texts):
        if texts:
            try:
                sys.stderr.write(''.join(texts))
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            del texts[:]


_relay: Optional[OutputRelay] = None
_relay_lock = threading.Lock()


def output_relay() -> OutputRelay:
    """The process's one OutputRelay."""
    global _relay
    with _relay_lock:
        if _relay is None:
            _relay = OutputRelay()
            atexit.register(_relay.drain, 1.0)
    return _relay


def standard_level(levelno: int) -> int:
    """The standard level nearest ``levelno`` (ties go up): a logger caches
    every level it is asked about, for as long as the process lives, and a
    remote could ask about millions (2 M levels held 180 MB)."""
    return min(STANDARD_LEVELS, key=lambda level: (abs(level - levelno), -level))


_logger_names_lock = threading.Lock()
_remote_logger_names: Set[str] = set()  # names remote records brought into being, all connections


def remote_logger(name: str, may_create: bool = True) -> Tuple[logging.Logger, bool]:
    """The controller's logger for a remote record named ``name``, and
    whether it was made for it: the logger of that name, if the controller
    has it, or if ``may_create`` and it may be made (a plain dotted name, at
    most LOGGER_NAME_MAX characters and LOGGER_DEPTH_MAX parts, while the
    process has made fewer than LOGGER_NAMES_MAX for remotes); else
    REMOTE_LOGGER.  Loggers live as long as the process, with a placeholder
    per dotted prefix: 1,000 dotted names per connection once made ~96,000
    at every reconnect."""
    existing = logging.Logger.manager.loggerDict.get(name)
    if isinstance(existing, logging.Logger):
        return existing, False  # the controller's own, or one made for a remote before
    with _logger_names_lock:
        if not may_create or len(name) > LOGGER_NAME_MAX or \
                len(_remote_logger_names) >= LOGGER_NAMES_MAX or \
                name.count('.') >= LOGGER_DEPTH_MAX or not _LOGGER_NAME.match(name):
            return logging.getLogger(REMOTE_LOGGER), False
        _remote_logger_names.add(name)
    return logging.getLogger(name), True


class RemoteOutput(object):
    """One connection's stderr and log records (see the module docstring).
    Called on the thread that reads the transport.

    What a host sends is shown escaped (``chopsticks.display.printable``)
    and each line carries the host's prefix: a ``\\r``, ANSI or OSC escape,
    or a newline inside a log message, cannot repaint the terminal nor
    make a line look as if another host sent it."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.prefix = '[%s] ' % host
        self.tail = bytearray()     # the last STDERR_TAIL bytes of stderr
        self.partial = bytearray()  # a line not ended yet
        self.started = False  # the agent's mark came on stderr (wire.AGENT_STARTED)
        self.loggers_made = 0  # logger names this connection brought into being

    def text(self) -> str:
        """The tail of stderr, for error messages."""
        return self.tail.decode('utf-8', 'replace')

    def stderr(self, data: bytes) -> None:
        tail = self.tail
        tail += data
        if not self.started:
            # Only kept, for a ConnectError, until the agent's mark: then
            # what follows it is the program's output (wire.AGENT_STARTED).
            at = tail.find(wire.AGENT_STARTED)
            data = b''
            if at >= 0:
                self.started = True
                del tail[at:at + len(wire.AGENT_STARTED)]
                data = bytes(tail[at:])
        if len(tail) > STDERR_TAIL:
            del tail[:len(tail) - STDERR_TAIL]
        if not data:
            return
        partial = self.partial
        partial += data
        relay = output_relay()
        if not relay.has_room():
            # Our stderr is not keeping up: count the lines instead of decoding them.
            relay.drop(self.host, partial.count(b'\n'))
            del partial[:partial.rfind(b'\n') + 1]
            if len(partial) > STDERR_LINE_MAX:
                relay.drop(self.host, 1)
                partial.clear()
            return
        lines: List[Any] = partial.split(b'\n')
        partial[:] = lines.pop()
        if len(partial) > STDERR_LINE_MAX:
            lines.append(bytes(partial))
            partial.clear()
        if lines:
            prefix = self.prefix
            text = ''.join(prefix + printable(line.decode('utf-8', 'replace')) + '\n'
                           for line in lines)
            relay.text(self.host, text, len(lines))

    def end(self) -> None:
        """The connection ended: show a last line that had no newline."""
        if self.started and self.partial:
            self.stderr(b'\n')

    def log(self, record: object) -> None:
        """A LOG frame's record (a dict); ValueError if it is not one."""
        if not isinstance(record, dict):
            raise ValueError('bad log record')
        fields: Dict[str, Any] = {}
        for key, kind in LOG_FIELDS.items():
            value = record.get(key)
            if kind is float and type(value) is int:
                value = float(value)
            if type(value) is kind:
                fields[key] = value
        levelno = fields.get('levelno')
        name = fields.get('name')
        if levelno is None or name is None:
            raise ValueError('bad log record')
        fields['levelno'] = levelno = standard_level(levelno)
        fields['levelname'] = logging.getLevelName(levelno)
        logger, made = remote_logger(name, self.loggers_made < LOGGER_NAMES_PER_CONNECTION)
        self.loggers_made += made
        fields['name'] = logger.name
        if logger.name != name:
            fields['remote_name'] = printable(name[:LOGGER_NAME_MAX])
        prefix = self.prefix
        fields['msg'] = printable_lines(fields.get('msg', ''), prefix)
        if 'exc_text' in fields:
            fields['exc_text'] = printable_lines(fields['exc_text'].rstrip('\n'), prefix)
        for key in TEXT_FIELDS:
            if key in fields:
                fields[key] = printable(fields[key])
        fields['args'] = None
        fields['host'] = self.host
        if logger.isEnabledFor(levelno):
            output_relay().log(self.host, logger, logging.makeLogRecord(fields))

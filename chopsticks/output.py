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
import sys
import threading
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from . import wire

STDERR_TAIL = 64 * 1024     # stderr kept for error messages
STDERR_LINE_MAX = 16 * 1024  # a longer line is shown in pieces
RELAY_BUFFER = 1 << 20      # remote output waiting for our stderr before lines are dropped
LOGGER_NAME_MAX = 200       # characters in a logger name a remote may use...
LOGGER_NAMES_MAX = 1000     # ...and how many names one connection may bring into being
REMOTE_LOGGER = 'chopsticks.remote'  # where records with other names go
LOG_FIELDS = frozenset(('name', 'levelno', 'msg', 'pathname', 'lineno', 'funcName', 'created',
                        'threadName', 'process', 'exc_text'))


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


class RemoteOutput(object):
    """One connection's stderr and log records (see the module docstring).
    Called on the thread that reads the transport."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.tail = bytearray()     # the last STDERR_TAIL bytes of stderr
        self.partial = bytearray()  # a line not ended yet
        self.started = False  # the agent's mark came on stderr (wire.AGENT_STARTED)
        self.log_names: Set[str] = set()  # logger names this remote used

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
            prefix = '[%s] ' % self.host
            text = ''.join(prefix + line.decode('utf-8', 'replace') + '\n' for line in lines)
            relay.text(self.host, text, len(lines))

    def end(self) -> None:
        """The connection ended: show a last line that had no newline."""
        if self.started and self.partial:
            self.stderr(b'\n')

    def log(self, record: object) -> None:
        """A LOG frame's record (a dict); ValueError if it is not one."""
        if not isinstance(record, dict):
            raise ValueError('bad log record')
        fields = {k: v for k, v in record.items() if k in LOG_FIELDS}
        levelno = fields.get('levelno')
        if not isinstance(levelno, int) or not isinstance(fields.get('name'), str):
            raise ValueError('bad log record')
        fields['levelname'] = logging.getLevelName(levelno)
        fields['msg'] = '[%s] %s' % (self.host, fields.get('msg'))
        fields['args'] = None
        fields['host'] = self.host
        # Loggers live as long as the process, with a placeholder for each dotted
        # prefix: a remote must not make us create unboundedly many or long ones.
        name = fields['name']
        if name not in self.log_names:
            if len(name) > LOGGER_NAME_MAX or len(self.log_names) >= LOGGER_NAMES_MAX:
                name = fields['name'] = REMOTE_LOGGER
            self.log_names.add(name)
        logger = logging.getLogger(name)
        if logger.isEnabledFor(levelno):
            output_relay().log(self.host, logger, logging.makeLogRecord(fields))

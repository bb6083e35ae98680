"""The remote agent: runs on the host, inside the host's own python.

The controller ships this file, ``wire.py`` and ``codec.py`` as source in the
bootstrap; they are installed as the modules ``_chopsticks_agent``,
``_chopsticks_wire`` and ``_chopsticks_codec``.  Everything here is stdlib
only and runs on Python 3.6 and newer: it is never imported on the
controller.

Threads: one thread at a time holds the reader role (see Agent.read_frames).
A call that ends a read runs on the reader thread; others run on a pool of
worker threads that grows on demand.  A call may block, import a module from
the controller or stream data, so the relief thread hands the reader role on
when a call run by the reader lasts.  Writes to the controller are
serialised by one lock.
"""
import builtins
import collections
import io
import os
try:
    import _pickle as pickle  # the C unpickler alone: pickle.py imports re, ~7 ms at start-up
except ImportError:
    import pickle
import sys
import threading
import time
import zlib

codec = sys.modules['_chopsticks_codec']
wire = sys.modules['_chopsticks_wire']

# The import system's own modules, loaded with the interpreter: importing
# importlib.util and importlib.machinery for two names costs ~2 ms at start-up.
_bootstrap = sys.modules.get('_frozen_importlib')
_bootstrap_external = sys.modules.get('_frozen_importlib_external')
if _bootstrap is None or _bootstrap_external is None:  # not CPython
    import importlib.machinery as _bootstrap
    import importlib.util as _bootstrap_external
ModuleSpec = _bootstrap.ModuleSpec
MAGIC_NUMBER = _bootstrap_external.MAGIC_NUMBER

IMPORT_TIMEOUT = 120.0  # seconds to wait for the controller to serve a module
ITER_WINDOW = 64        # items a generator may send ahead of the controller's credit (its replies.ITER_WINDOW)
WORKER_IDLE_EXIT = 30.0  # seconds an idle worker thread waits before exiting
RELIEF_TICK = 0.002     # seconds a call may run on the reader thread before reading moves on
# Longest sleep between the relief thread's looks while calls come.  Its
# wake-ups are what an agent called now and then costs: 1,000 Local agents
# called once per round on 2 cores woke 2-5 times a call at 0.05 s (7,564
# context switches and 182 ms of the agents' CPU per round against 1,627 and
# 62 ms at 0.5 s; rounds of 178 against 69 ms: bench/RESULTS.md).  The price:
# a call that blocks after a quiet spell holds back the calls pipelined
# behind it for up to half a second.
RELIEF_NAP_MAX = 0.5
RELIEF_PARK_AFTER = 1.0  # seconds without a call after which the relief thread parks

agent = None  # the running Agent, for code that wants to know (relays, logging)

# Temp files that code on this host is writing right now, temp name -> path
# (chopsticks.files_remote and the file tasks keep it): put and the tasks
# promise that an interrupted write leaves no temp file behind, and when the
# agent leaves with os._exit their own cleanup never runs.
temp_files = {}
TEMP_FILES_REMOVED_MAX = 1000  # a bound on the work done while leaving


def leave(status):
    """os._exit(status), after removing the temp files being written."""
    try:
        for path in list(temp_files.values())[:TEMP_FILES_REMOVED_MAX]:
            try:
                os.unlink(path)
            except OSError:
                pass
    finally:
        os._exit(status)


# --- writing to the controller ----------------------------------------------

class Channel(object):
    """The framed pipe back to the controller."""

    def __init__(self, fd):
        self.fd = fd
        self.writer = wire.CombiningWriter(fd)
        self.lock = self.writer.lock  # held: no other thread starts writing

    def send(self, rid, op, payload=b''):
        self.writer.write_frame(wire.frame(rid, op, payload))

    def send_value(self, rid, op, value):
        self.send_parts(rid, op, codec.encode_parts(value))

    def send_parts(self, rid, op, parts):
        """Send an encoded value (``codec.encode_parts``)."""
        if len(parts) == 1 and len(parts[0]) < 65536:
            self.writer.write_frame(wire.frame(rid, op, bytes(parts[0])))
        else:
            self.writer.write(wire.frame_parts(rid, op, parts))


# --- the worker pool ----------------------------------------------------------

class Workers(object):
    """Threads that run calls.

    A call may block for as long as it likes (sleep, wait for a lock another
    call holds, import from the controller), so a queued call must never wait
    behind blocked ones forever.  But a thread per call makes a burst of tiny
    calls slow.  So: up to EAGER threads start as soon as calls are waiting;
    beyond that a watchdog adds a thread whenever the queue has not moved for
    STALL seconds, and idle threads retire after a while.

    Invariant: ``spare`` is the number of waiting workers minus the number of
    queued jobs.
    """

    EAGER = 8
    STALL = 0.02

    def __init__(self):
        self.cond = threading.Condition(threading.Lock())
        self.jobs = collections.deque()
        self.spare = 0
        self.threads = 0
        self.taken = 0  # jobs taken off the queue so far, for the watchdog
        self.watchdog = None

    def submit(self, job, *args):
        with self.cond:
            self.jobs.append((job, args))
            if self.spare > 0:
                self.spare -= 1
                self.cond.notify()
                return
            if self.threads >= self.EAGER:
                self._ensure_watchdog()
                return
            self.spare -= 1  # the new thread takes a queued job
            self.threads += 1
        self._start_thread()

    def submit_first(self, job, *args):
        """Run ``job`` before anything queued, on a new thread if none is idle."""
        with self.cond:
            if self.spare > 0:
                self.spare -= 1
                self.jobs.appendleft((job, args))
                self.cond.notify()
                return
            self.jobs.appendleft((job, args))
            self.spare -= 1
            self.threads += 1
        self._start_thread()

    def serve_forever(self):
        """Make the calling thread a worker that never retires."""
        self._run(retire=False)

    def _start_thread(self):
        t = threading.Thread(target=self._run, name='chopsticks-worker')
        t.daemon = True
        t.start()

    def _ensure_watchdog(self):
        if self.watchdog is None:
            self.watchdog = threading.Thread(target=self._watch, name='chopsticks-watchdog')
            self.watchdog.daemon = True
            self.watchdog.start()

    def _watch(self):
        while True:
            with self.cond:
                taken = self.taken
            time.sleep(self.STALL)
            with self.cond:
                if self.jobs and self.taken == taken and self.spare <= 0:
                    self.spare -= 1
                    self.threads += 1
                    start = True
                else:
                    start = False
            if start:
                self._start_thread()

    def _run(self, retire=True):
        if not retire:
            with self.cond:
                self.threads += 1
        while True:
            with self.cond:
                self.spare += 1
                while not self.jobs:
                    if not self.cond.wait(WORKER_IDLE_EXIT) and not self.jobs and retire:
                        self.spare -= 1
                        self.threads -= 1
                        return
                job, args = self.jobs.popleft()
                self.taken += 1
            try:
                job(*args)
            except BaseException:
                import traceback
                traceback.print_exc()
            job = args = None


# --- functions shipped as source ----------------------------------------------

# Functions from the controller's __main__, lambdas and closures arrive as
# source, with the globals they use as values, and are defined in a namespace
# that starts as this one.  Each call has its own namespace per source file
# (CallUnpickler.namespaces): the functions of one file sent in one call can
# refer to each other, as in their module, and two calls running at once never
# see each other's globals (one namespace for all once gave a running call the
# globals of the call sent after it).
controller_main = {'__name__': '__chopsticks_main__', '__builtins__': builtins}
_compiled = {}


def rebuild_function(source, name, filename, firstlineno, globals_, closure,
                     defaults, kwdefaults, self_cells=(), self_globals=(), namespaces=None):
    """Define a function (or class) the controller sent as source.

    Defaults travel as values (the source's are placeholders), closure
    variables become real cells of a wrapper function so ``nonlocal`` works,
    and ``self_cells``/``self_globals`` are the closure and global names by
    which the function refers to itself.  ``namespaces`` maps a source file
    to the namespace its functions share in this call."""
    free = sorted(closure)
    key = (source, filename, firstlineno, tuple(free), tuple(self_cells))
    code = _compiled.get(key)
    if code is None:
        code = _compile_shipped(source, name, filename, firstlineno, free, self_cells)
        _compiled[key] = code
        import linecache  # not at start-up: it costs milliseconds and most calls need none
        linecache.cache[filename] = (len(source), None, ('\n' * (firstlineno - 1) + source).splitlines(True), filename)
    namespace = None if namespaces is None else namespaces.get(filename)
    if namespace is None:
        namespace = dict(controller_main)
        if namespaces is not None:
            namespaces[filename] = namespace
    namespace.update(globals_)
    exec(code, namespace)
    if free or self_cells:
        fn = namespace.pop('__chopsticks_closure__')(*[closure[n] for n in free])
    else:
        fn = namespace[name]
    if isinstance(fn, type(rebuild_function)):
        fn.__defaults__ = defaults
        fn.__kwdefaults__ = kwdefaults
        fn.__annotations__ = {}  # evaluated on the controller only: see serialize
    for alias in self_globals:
        namespace[alias] = fn
    return fn


def _compile_shipped(source, name, filename, firstlineno, free, self_cells):
    """Compile shipped source; with closure variables, inside a wrapper
    ``def __chopsticks_closure__(<free>): <source>; return <name>`` built as a
    syntax tree (indenting the text would change multi-line strings)."""
    if not free and not self_cells:
        # Pad so line numbers in remote tracebacks match the controller's file.
        return compile('\n' * (firstlineno - 1) + source, filename, 'exec', dont_inherit=True)
    import ast
    body = ast.parse(source, filename).body
    for alias in self_cells:
        body += ast.parse('%s = %s' % (alias, name)).body
    body += ast.parse('return %s' % name).body
    for node in body:
        ast.increment_lineno(node, firstlineno - 1)
    tree = ast.parse('def __chopsticks_closure__(%s): pass' % ', '.join(free))
    tree.body[0].body = body
    return compile(tree, filename, 'exec', dont_inherit=True)


class CallUnpickler(pickle.Unpickler):
    """Resolves the controller's persistent ids: source functions and modules."""

    def __init__(self, file):
        pickle.Unpickler.__init__(self, file)
        self.namespaces = {}  # source file -> the namespace of its functions in this call
        # id(pid) -> (pid, what it made): the controller sends an object met
        # again as the same, memoized, tuple (the class of each of many
        # instances), which is made once, so its instances share one class.
        self.made = {}

    def persistent_load(self, pid):
        made = self.made.get(id(pid))
        if made is None:
            made = self.made[id(pid)] = (pid, self._make(pid))
        return made[1]

    def _make(self, pid):
        kind = pid[0]
        if kind == 'fn':
            return rebuild_function(*pid[1:], namespaces=self.namespaces)
        if kind == 'namedtuple':  # a class collections.namedtuple made in a script
            import collections
            name, fields, defaults = pid[1:]
            cls = collections.namedtuple(name, fields)
            cls.__new__.__defaults__ = defaults or None
            cls.__module__ = controller_main['__name__']
            return cls
        if kind == 'mod':
            __import__(pid[1])
            return sys.modules[pid[1]]
        if kind == 'code':
            # Only sent when both sides run the same Python version (3.8+ here).
            import marshal
            import types
            code, name, globals_, closure, defaults, kwdefaults, self_cells, self_globals = pid[1:]
            code = marshal.loads(code)
            namespace = dict(controller_main)
            namespace.update(globals_)
            cells = tuple(types.CellType(closure[n]) if n in closure else types.CellType()
                          for n in code.co_freevars)
            fn = types.FunctionType(code, namespace, name, defaults, cells or None)
            fn.__kwdefaults__ = kwdefaults
            for alias in self_cells:
                cells[code.co_freevars.index(alias)].cell_contents = fn
            for alias in self_globals:
                namespace[alias] = fn
            return fn
        raise pickle.UnpicklingError('unknown persistent id %r' % (kind,))


def load_call(payload):
    try:
        return pickle.loads(payload)  # a call by reference has no persistent ids: faster
    except pickle.UnpicklingError:
        return CallUnpickler(io.BytesIO(payload)).load()


# --- the import hook ----------------------------------------------------------

class ControllerFinder(object):
    """Last on sys.meta_path: asks the controller for modules this host lacks.

    The controller answers with the module and the modules it imports (its
    static import closure), so one round trip usually serves a whole package,
    and with the names it cannot serve, so that the host never asks for them.
    We come last: the host's own finders have already looked.
    """

    def __init__(self, agent):
        self.agent = agent
        self.modules = {}    # fullname -> (kind, origin, source, package_dir, listing)
        self.missing = set()  # names the controller said it cannot serve
        self.stdlib = frozenset()  # top-level names it never serves (its stdlib)
        self.data = {}  # path -> bytes: package data files the controller sent ahead
        self.errors = {}     # fullname -> why it cannot be served (C extension...)
        self.requests = 0    # round trips made, for tests and the benchmark
        self.lock = threading.Lock()

    def find_spec(self, fullname, path=None, target=None):
        agent = self.agent
        me = threading.get_ident()
        if agent.reader == me and agent.inline_caller() != me:
            return None  # the reader, between calls, must never wait for itself
        entry = self.modules.get(fullname)
        if entry is None:
            if fullname in self.missing or fullname.partition('.')[0] in self.stdlib:
                return None
            parent = fullname.rpartition('.')[0]
            if parent and parent not in self.modules and not _namespace(sys.modules.get(parent)):
                # The controller serves the submodules of packages it served,
                # and portions of namespace packages: not those of the host's
                # own regular packages, nor of six.moves and its like.
                return None
            self._fetch(fullname)
            entry = self.modules.get(fullname)
            if entry is None:
                reason = self.errors.get(fullname)
                if reason:
                    raise ImportError(reason, name=fullname)
                return None
        kind, origin, source, package_dir, listing = entry[:5]
        loader = ControllerLoader(self, fullname, entry)
        is_package = package_dir is not None
        spec = ModuleSpec(fullname, loader, origin=origin, is_package=is_package)
        if is_package:
            spec.submodule_search_locations = [package_dir]
        spec.has_location = origin is not None
        return spec

    def _fetch(self, fullname):
        self.requests += 1
        reply = self.agent.request(('module', fullname))
        self.add(reply)

    def add(self, reply):
        with self.lock:
            for name, entry in reply.get('modules', {}).items():
                self.modules.setdefault(name, tuple(entry))
            self.missing.update(reply.get('missing', ()))
            self.errors.update(reply.get('errors', {}))
            if 'stdlib' in reply:
                self.stdlib = frozenset(reply['stdlib'])
            self.data.update(reply.get('data', ()))

    def invalidate_caches(self):
        self.missing.clear()


def _namespace(module):
    """Whether ``module`` is a namespace package (or unknown: then ask)."""
    spec = getattr(module, '__spec__', None)
    if spec is None:
        return True
    return spec.loader is None or type(spec.loader).__name__ in ('NamespaceLoader',
                                                                  '_NamespaceLoader')


class ControllerLoader(object):
    def __init__(self, finder, fullname, entry):
        self.finder = finder
        self.name = fullname
        (self.kind, self.origin, self.source, self.package_dir, self.listing,
         self.magic, self.code) = entry

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(self.get_code(self.name), module.__dict__)

    def is_package(self, fullname):
        return self.package_dir is not None

    def get_source(self, fullname):
        return self.source.decode('utf-8') if isinstance(self.source, bytes) else self.source

    def get_code(self, fullname):
        if self.code and self.magic == MAGIC_NUMBER:
            import marshal
            try:
                return marshal.loads(self.code)  # compiled by the controller: same version
            except (EOFError, ValueError, TypeError):
                pass
        filename = self.origin or '<namespace package %s>' % self.name
        try:
            return compile(self.source, filename, 'exec', dont_inherit=True)
        except SyntaxError as e:
            # Most often code written for a newer Python than this host's:
            # say so, beside Python's own words (the same type, for callers).
            e.msg = '%s (%s comes from the controller, and this host runs Python %s: it may ' \
                'need a newer one; pass python= to choose another)' % (
                    e.msg, self.name, '.'.join(map(str, sys.version_info[:3])))
            raise

    def get_filename(self, fullname):
        return self.origin

    def get_data(self, path):
        data = self.finder.data.get(path)
        if data is not None:
            return data
        reply = self.finder.agent.request(('data', path))
        if 'error' in reply:
            raise OSError(reply['error'])
        return reply['data']

    def get_resource_reader(self, fullname):
        if self.package_dir is None:
            return None
        return ResourceReader(self, self.package_dir, self.listing)


class ResourceReader(object):
    """importlib.resources for a package served by the controller."""

    def __init__(self, loader, directory, listing):
        self.loader = loader
        self.directory = directory
        self.listing = listing or {}

    def open_resource(self, resource):
        return io.BytesIO(self.loader.get_data(self.directory + '/' + resource))

    def resource_path(self, resource):
        raise FileNotFoundError(resource)

    def is_resource(self, name):
        return self.listing.get(name) == 'file'

    def contents(self):
        return iter(self.listing)

    def files(self):
        return Traversable(self.loader, self.directory, self.listing, '')


class Traversable(object):
    """Enough of importlib.abc.Traversable for importlib.resources.files()."""

    def __init__(self, loader, directory, listing, relpath):
        self.loader = loader
        self.directory = directory
        self.listing = listing
        self.relpath = relpath

    @property
    def name(self):
        return self.relpath.rsplit('/', 1)[-1]

    def _kind(self):
        if not self.relpath:
            return 'dir'
        return self.listing.get(self.relpath)

    def is_dir(self):
        return self._kind() == 'dir'

    def is_file(self):
        return self._kind() == 'file'

    def iterdir(self):
        prefix = self.relpath + '/' if self.relpath else ''
        for name in self.listing:
            if name.startswith(prefix) and '/' not in name[len(prefix):]:
                yield Traversable(self.loader, self.directory, self.listing, name)

    def joinpath(self, *names):
        rel = '/'.join([self.relpath] + [n for n in names if n]).strip('/')
        return Traversable(self.loader, self.directory, self.listing, rel)

    __truediv__ = joinpath

    def read_bytes(self):
        return self.loader.get_data(self.directory + '/' + self.relpath)

    def read_text(self, encoding='utf-8'):
        return self.read_bytes().decode(encoding)

    def open(self, mode='r', *args, **kwargs):
        data = io.BytesIO(self.read_bytes())
        return data if 'b' in mode else io.TextIOWrapper(data, *args, **kwargs)

    def __fspath__(self):
        raise FileNotFoundError('%s is served by the controller, not on this disk' % self.relpath)


# --- remote logging -------------------------------------------------------------

class ControllerLogHandler(object):
    """Sends log records to the controller, whose logging system handles them."""

    level = 0

    def __init__(self, channel):
        self.channel = channel
        self.local = threading.local()

    def install(self, logging):
        handler = logging.Handler()
        handler.emit = self.emit
        handler.setLevel(0)
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(agent.config.get('log_level', logging.WARNING))

    def emit(self, record):
        if getattr(self.local, 'busy', False):
            return
        self.local.busy = True
        try:
            exc_text = None
            if record.exc_info:
                import traceback
                exc_text = ''.join(traceback.format_exception(*record.exc_info))
            self.channel.send_value(0, wire.LOG, {
                'name': record.name, 'levelno': record.levelno, 'msg': record.getMessage(),
                'pathname': record.pathname, 'lineno': record.lineno, 'funcName': record.funcName,
                'created': record.created, 'threadName': record.threadName,
                'process': record.process, 'exc_text': exc_text,
            })
        except Exception:
            pass
        finally:
            self.local.busy = False


class LoggingWatcher(object):
    """Installs the log handler when the remote first imports logging.

    Importing logging costs milliseconds; most calls never log, so the agent
    does not import it itself.
    """

    def __init__(self, handler):
        self.handler = handler

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'logging':
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec('logging')
        original_exec = spec.loader.exec_module
        handler = self.handler

        def exec_module(module):
            original_exec(module)
            handler.install(module)
        spec.loader.exec_module = exec_module
        return spec


# --- the agent ------------------------------------------------------------------

class InputStream(object):
    """The chunks a CALL_STREAM function reads, fed by the reader thread."""

    def __init__(self, agent, rid):
        self.agent = agent
        self.rid = rid
        self.cond = threading.Condition(threading.Lock())
        self.chunks = collections.deque()
        self.done = False
        self.error = None
        self.lent = None  # the chunk next_buffer returned last, until the next call

    def feed(self, chunk):
        with self.cond:
            self.chunks.append(chunk)
            self.cond.notify()

    def finish(self, error):
        with self.cond:
            self.done = True
            self.error = error
            self.cond.notify()

    def __iter__(self):
        return self

    def __next__(self):
        chunk = self.next_buffer()
        if type(chunk) is bytes:
            return chunk
        data = bytes(chunk)
        self._give_back()
        return data

    def next_buffer(self):
        """The next chunk as it arrived, bytes or a memoryview (a big one is
        read straight into its own buffer): for readers that need only the
        buffer protocol, one copy fewer than iterating.  A memoryview is
        valid until the next call: its buffer then holds a later frame."""
        self._give_back()
        with self.cond:
            while not self.chunks:
                if self.done:
                    self.agent.parser.drop_spares()
                    if self.error:
                        raise IOError('controller aborted the transfer: %s' % self.error)
                    raise StopIteration
                self.cond.wait()
            chunk = self.lent = self.chunks.popleft()
        self.agent.channel.send_value(self.rid, wire.CREDIT, len(chunk))
        return chunk

    def _give_back(self):
        lent = self.lent
        if lent is not None:
            self.lent = None
            self.agent.parser.give_back(lent)


class Agent(object):
    def __init__(self, rfd, wfd, config):
        self.rfd = rfd
        self.channel = Channel(wfd)
        self.config = config
        self.workers = Workers()
        # The reader runs calls inline (see read_frames); the relief thread
        # takes over reading if one lasts.  A call run inline holds a
        # one-item list, its slot, in ``inline_slot``; whoever pops the item
        # owns the reader role: the reader when the call ends, or whoever
        # relieves the call meanwhile (_take_role).  list.pop is atomic, so
        # exactly one of them does, without a lock.  In a busy fan-out, where
        # the other processes keep an agent's caches and TLB cold, what a
        # call touches besides itself is what it costs: each lock section
        # cost a reply about a microsecond, time.monotonic() half of one.
        self.reader = None  # ident of the thread that holds the reader role
        self.inline_slot = []  # the latest inline call's slot; empty: none runs
        self.inline_queue = collections.deque()  # (rid, payload) of calls read, to run inline
        self.relief_started = False
        self.relief_parked = False
        self.role_lock = threading.Lock()  # for starting and parking the relief thread
        self.role = threading.Condition(self.role_lock)
        max_frame = config.get('max_frame', 1 << 30)
        self.parser = wire.FrameParser(max_frame, preallocate=max_frame)  # see its docstring
        # An mmap: a slice of it is bytes, one copy (FrameParser.feed's lone frame).
        self.read_buffer = wire.aligned_buffer(1 << 18)
        self.finder = ControllerFinder(self)
        self.requests = {}  # our request id -> [event, reply]
        self.next_request = 0
        self.request_lock = threading.Lock()
        self.iter_credits = {}  # rid -> threading.Semaphore
        self.cancelled = set()
        self.streams = {}  # rid -> InputStream

    def wide_pipe(self, direction):
        """Widen stdin (``'receive'``) or stdout (``'send'``) for a bulk
        transfer: ``with agent.wide_pipe('receive'): ...`` (see wire.WidePipe)."""
        return wire.WidePipe(self.rfd if direction == 'receive' else self.channel.fd)

    # requests we make to the controller (imports)
    def request(self, query):
        self.hand_off_reading()  # the answer needs a reader
        event = threading.Event()
        slot = [event, None]
        with self.request_lock:
            self.next_request += 1
            rid = self.next_request
            self.requests[rid] = slot
        self.channel.send_value(rid, wire.IMPORT, query)
        if not event.wait(IMPORT_TIMEOUT):
            self.requests.pop(rid, None)
            raise ImportError('controller did not answer %r within %ds' % (query, IMPORT_TIMEOUT))
        return slot[1]

    def read_frames(self):
        """Hold the reader role: read and dispatch frames.

        The calls a read brings run right here on the reader thread, one
        after the other: handing them to other threads costs more thread
        switches (and fights for the GIL) than small calls take.  While one
        runs nobody reads, so the relief thread hands the reader role to
        another thread when a call lasts (see _relieve), and a call that waits
        for the controller (an import) hands it over at once; the calls still
        queued then go to the workers.  This thread joins the workers when
        its call ends.
        """
        parser = self.parser
        fd = self.rfd
        # One buffer for whoever holds the reader role (the parser copies what
        # it keeps): os.read(fd, 256 KiB) would allocate that much per read.
        buf = self.read_buffer
        self.reader = me = threading.get_ident()
        # For the commonest read by far, one whole call and nothing else:
        # run_alone, run_call and, for a small reply, send_value inlined (the
        # reply still goes through CombiningWriter.write_frame).  In a
        # one-call-to-48-hosts round the other processes leave an agent's
        # caches cold, and each Python function a call went through cost it
        # about half a microsecond: inlined, a quarter less agent CPU per
        # call (25.4 to 18.7 µs; 33.0 to 24.8 on a busier machine) and 6-9%
        # off the round; going through send_value again cost 3.7 µs and 10%
        # (bench/RESULTS.md).  Anything else goes the general way below.
        size = wire.HEADER.size
        unpack, pack = wire.HEADER.unpack_from, wire.HEADER.pack
        CALL, RESULT = wire.CALL, wire.RESULT
        loads, encode_parts = pickle.loads, codec.encode_parts
        writer = self.channel.writer
        small, write_lock, write_all, wfd = writer.SMALL - size, writer.lock, wire.write_all, writer.fd
        readv = os.readv
        while True:
            room = None if parser.have is None else parser.room()  # a big frame's own buffer
            try:
                n = readv(fd, [buf if room is None else room])
            except OSError:
                n = 0
            if not n:
                leave(0)  # the controller hung up: leave, whatever calls still run
            if room is None and n > size and not parser.buf:
                length, rid, op = unpack(buf, 0)
                if op == CALL and length == n - size:
                    slot = [me]
                    self.inline_slot = slot  # as in run_alone
                    if self.relief_parked or not self.relief_started:
                        self._wake_relief()
                    try:
                        payload = buf[size:n]
                        try:
                            fn, args, kwargs = loads(payload)
                        except pickle.UnpicklingError:
                            fn, args, kwargs = load_call(payload)  # sent as source
                        value = fn(*args, **kwargs)
                        parts = [b'N'] if value is None else encode_parts(value)
                        body = parts[0]
                        if len(parts) == 1 and len(body) <= small:
                            # CombiningWriter.write_frame's commonest case, inlined.
                            frame = pack(len(body), rid, RESULT) + body
                            with write_lock:
                                idle = not (writer.writing or writer.corked or writer.queue or
                                            writer.error is not None)
                                if idle:
                                    try:
                                        write_all(wfd, [frame])
                                    except BaseException as e:
                                        writer._fail(e)
                                        raise
                            if not idle:
                                writer.write([frame])
                        else:
                            self.channel.send_parts(rid, RESULT, parts)
                    except BaseException as e:
                        self.send_error(rid, e)
                    try:
                        slot.pop()
                    except IndexError:
                        return  # relieved meanwhile: another thread reads now
                    continue
            try:
                frames = parser.feed(buf, n) if room is None else parser.filled(n)
            except Exception as e:
                reader_failed(e)
            calls = self.inline_queue
            for rid, op, payload in frames:
                if op == wire.CALL:
                    calls.append((rid, payload))
                    continue
                try:
                    self.dispatch(rid, op, payload)
                except Exception as e:
                    reader_failed(e)
            if calls and not self.run_inline(calls):
                return  # another thread reads now

    def run_inline(self, calls):
        """Run the queued ``calls`` on the reader thread, in order; False if
        the reader role moved meanwhile (the rest went to the workers)."""
        me = threading.get_ident()
        writer = self.channel.writer
        corked_at = None
        while calls:
            rid, payload = calls.popleft()
            # Replies wait while more calls are queued, to go in one write,
            # but never longer than RELIEF_TICK: other threads' frames
            # (keepalive answers, import requests) wait with them.  Corked
            # before the slot is published, so never after another thread
            # took the role (which uncorks: _start_new_reader).
            if calls:
                now = time.monotonic()
                if corked_at is None:
                    writer.cork()
                    corked_at = now
                elif now - corked_at >= RELIEF_TICK:
                    writer.uncork()
                    corked_at = None
            elif corked_at is not None:
                writer.uncork()
                corked_at = None
            if not self.run_alone(rid, payload, me):
                return False  # relieved meanwhile: another thread reads now
        return True

    def run_alone(self, rid, payload, me):
        """Run one call on the reader thread ``me``; False if it was relieved
        meanwhile, and another thread reads now."""
        slot = [me]
        self.inline_slot = slot  # from here on the call may be relieved
        # The slot is published before relief_parked is looked at, and
        # _relieve does the reverse: one of us sees the other.
        if self.relief_parked or not self.relief_started:
            self._wake_relief()
        self.run_call(rid, payload)
        try:
            slot.pop()
        except IndexError:
            return False
        return True

    def inline_caller(self):
        """The ident of the thread running a call inline, or None."""
        try:
            return self.inline_slot[0]
        except IndexError:
            return None

    def _take_role(self, slot):
        """Take the reader role from the call holding ``slot``: returns the
        calls queued behind it, or None if that call has ended (its thread
        reads on)."""
        try:
            slot.pop()
        except IndexError:
            return None
        self.reader = None  # until the next reader starts (see ControllerFinder)
        queued = list(self.inline_queue)  # the reader touches it no more
        self.inline_queue.clear()
        return queued

    def _start_new_reader(self, queued):
        self.channel.writer.uncork()  # the replies held for the batch go now
        for rid, payload in queued:
            self.workers.submit(self.run_call, rid, payload)
        self.workers.submit_first(self.read_frames)

    def hand_off_reading(self):
        """Called by a call about to wait on something: if it runs on the
        reader thread, another thread takes the reader role now."""
        slot = self.inline_slot
        try:
            caller = slot[0]
        except IndexError:
            return
        if caller != threading.get_ident():
            return  # not run inline, or relieved already
        queued = self._take_role(slot)
        if queued is not None:
            self._start_new_reader(queued)

    def _wake_relief(self):
        with self.role_lock:
            if not self.relief_started:
                self.relief_started = True
                relief = threading.Thread(target=self._relieve, name='chopsticks-relief')
                relief.daemon = True
                relief.start()
            elif self.relief_parked:
                self.relief_parked = False
                self.role.notify()

    def _relieve(self):
        """Give the reader role to another thread when a call run inline lasts.

        Waking this thread for every call cost more than the call (two
        wake-ups and a fight for the GIL with the call it watches: 90 µs of
        the agent's 200 µs per trivial call, measured with ``perf stat``).
        So calls never wake it: it looks now and then, RELIEF_TICK after it
        saw a call running (which it relieves if it is still the same one),
        then less and less often (up to RELIEF_NAP_MAX) while it finds none
        running, and parks after RELIEF_PARK_AFTER without a call; only then
        does the next call wake it.  A call that blocks is thus relieved after
        RELIEF_TICK to RELIEF_NAP_MAX + RELIEF_TICK; one that waits for the
        controller hands reading on itself (hand_off_reading).
        """
        nap = RELIEF_TICK
        seen = None  # inline_slot at the previous look
        quiet_since = time.monotonic()
        while True:
            hand_off = None
            slot = self.inline_slot
            if slot:  # a call runs inline
                if slot is seen:  # the same one as a nap ago, at least RELIEF_TICK
                    hand_off = self._take_role(slot)  # the call runs on, unwatched
                nap = RELIEF_TICK
                quiet_since = None
            else:
                now = time.monotonic()
                if slot is not seen or quiet_since is None:
                    quiet_since = now  # calls ran since the previous look
                elif now - quiet_since >= RELIEF_PARK_AFTER:
                    with self.role_lock:
                        self.relief_parked = True
                        # A call that started since the look above may have
                        # seen relief_parked False: look again before waiting.
                        if self.inline_slot is slot:
                            while self.relief_parked:
                                self.role.wait()
                        self.relief_parked = False
                    quiet_since = time.monotonic()
                    nap = 0.0  # a call has just started: look after RELIEF_TICK * 2
                nap = min(max(nap, RELIEF_TICK) * 2, RELIEF_NAP_MAX)
            seen = slot
            if hand_off is not None:
                self._start_new_reader(hand_off)
            else:
                time.sleep(nap)

    def dispatch(self, rid, op, payload):
        """Handle a frame other than CALL (read_frames queues those to run inline)."""
        if op == wire.DATA:
            stream = self.streams.get(rid)
            if stream is not None:
                stream.feed(payload)
        elif op == wire.MODULE:
            slot = self.requests.pop(rid, None)
            if slot is not None:
                slot[1] = codec.decode(zlib.decompress(payload))
                slot[0].set()
        elif op == wire.MODULES:
            self.finder.add(codec.decode(zlib.decompress(payload)))
        elif op == wire.CALL_ITER:
            self.iter_credits[rid] = threading.Semaphore(ITER_WINDOW)
            self.workers.submit(self.run_iter, rid, payload)
        elif op == wire.CREDIT:
            sem = self.iter_credits.get(rid)
            if sem is not None:
                for _ in range(codec.decode(payload)):
                    sem.release()
        elif op == wire.CANCEL:
            self.cancelled.add(rid)
            sem = self.iter_credits.get(rid)
            if sem is not None:
                sem.release()
        elif op == wire.CALL_STREAM:
            # The worker gets the stream itself: by the time it runs, DATA_END
            # may already have taken it out of self.streams.
            stream = self.streams[rid] = InputStream(self, rid)
            self.workers.submit(self.run_stream, rid, payload, stream)
        elif op == wire.DATA_END:
            stream = self.streams.pop(rid, None)
            if stream is not None:
                stream.finish(codec.decode(payload))
        elif op == wire.PING:
            self.channel.send(rid, wire.PONG)

    def send_error(self, rid, exc):
        etype = type(exc)
        module = etype.__module__
        if module == '_chopsticks_codec':
            module = 'chopsticks.codec'
        name = etype.__qualname__ if module == 'builtins' else '%s.%s' % (module, etype.__qualname__)
        try:
            msg = str(exc)
        except Exception:
            msg = '<unprintable %s>' % etype.__name__
        import traceback
        tb = ''.join(traceback.format_exception(etype, exc, exc.__traceback__))
        self.channel.send_value(rid, wire.ERROR, {'type': name, 'msg': msg, 'traceback': tb})

    def run_call(self, rid, payload):
        try:
            fn, args, kwargs = load_call(payload)
            result = fn(*args, **kwargs)
            self.channel.send_value(rid, wire.RESULT, result)
        except BaseException as e:
            self.send_error(rid, e)

    def run_stream(self, rid, payload, stream):
        try:
            fn, args, kwargs = load_call(payload)
            with self.wide_pipe('receive'):  # the controller widens its end too
                result = fn(stream, *args, **kwargs)
            self.channel.send_value(rid, wire.RESULT, result)
        except BaseException as e:
            self.send_error(rid, e)
        finally:
            self.streams.pop(rid, None)

    def run_iter(self, rid, payload):
        credits = self.iter_credits[rid]
        iterator = None
        try:
            fn, args, kwargs = load_call(payload)
            iterator = iter(fn(*args, **kwargs))
            for item in iterator:
                # Credit first: the controller refuses an item beyond ITER_WINDOW.
                credits.acquire()
                if rid in self.cancelled:
                    break
                self.channel.send_value(rid, wire.ITEM, item)
            self.channel.send(rid, wire.END)
        except BaseException as e:
            self.send_error(rid, e)
        finally:
            close = getattr(iterator, 'close', None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
            self.iter_credits.pop(rid, None)
            self.cancelled.discard(rid)


def reader_failed(exc):
    """Nobody would read the controller's frames any more: say why and leave,
    so the controller sees the connection end instead of waiting forever."""
    try:
        sys.stderr.write('chopsticks agent: cannot read what the controller sent (%s: %s); '
                         'exiting\n' % (type(exc).__name__, exc))
        sys.stderr.flush()
    finally:
        leave(2)


def _take_stdio():
    """Keep the protocol pipes for ourselves; give user code harmless stdio.

    fd 0 becomes /dev/null (a child process must not eat protocol bytes) and
    fd 1 becomes a copy of fd 2, so print() and subprocess output travel on
    stderr, which the controller shows prefixed with the host name.
    """
    rfd = os.dup(0)
    wfd = os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, 'w', closefd=False), encoding='utf-8',
                                  errors='backslashreplace', line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, 'w', closefd=False), encoding='utf-8',
                                  errors='backslashreplace', line_buffering=True)
    return rfd, wfd


def read_config(fd):
    """The settings frame the controller sends right after the payload."""
    header = b''
    while len(header) < wire.HEADER.size:
        chunk = os.read(fd, wire.HEADER.size - len(header))
        if not chunk:
            os._exit(0)
        header += chunk
    length, _, op = wire.HEADER.unpack(header)
    body = b''
    while len(body) < length:
        chunk = os.read(fd, length - len(body))
        if not chunk:
            os._exit(0)
        body += chunk
    if op != wire.CONFIG:
        sys.exit('chopsticks: expected the settings frame, got op %d' % op)
    return codec.decode(body)


def _default_hangup():
    """SIGHUP as on a host reached by ssh: a controller started under
    ``nohup`` ignores it, and a Local or sudo agent would pass that on to
    every command it runs, down to the daemons they start, where a POSIX
    shell cannot trap a signal ignored on entry: ``service x reload`` then
    sent a SIGHUP nothing heard.  (The agent leads no terminal's foreground
    group, so no hangup reaches it but one sent on purpose.)"""
    import _signal  # (signal.py would import enum: a millisecond of the start-up)
    if _signal.getsignal(_signal.SIGHUP) == _signal.SIG_IGN:
        _signal.signal(_signal.SIGHUP, _signal.SIG_DFL)


def main():
    global agent
    _default_hangup()
    rfd, wfd = _take_stdio()
    agent = Agent(rfd, wfd, read_config(rfd))
    sys.meta_path.append(agent.finder)
    log_handler = ControllerLogHandler(agent.channel)
    if 'logging' in sys.modules:
        log_handler.install(sys.modules['logging'])
    else:
        sys.meta_path.insert(0, LoggingWatcher(log_handler))
    sys.modules.setdefault('__chopsticks_main__', type(sys)('__chopsticks_main__'))
    try:
        os.write(2, wire.AGENT_STARTED)
    except OSError:
        pass  # no stderr: nothing to tell apart
    agent.channel.send_value(0, wire.HELLO, {
        'pid': os.getpid(),
        'python': sys.executable,
        'version': tuple(sys.version_info[:3]),
        'platform': sys.platform,
        'hostname': os.uname().nodename,
        'magic': MAGIC_NUMBER,
    })
    # The relief thread starts now, while the controller reads the HELLO,
    # not inside the first call: starting a thread cost that call 0.2 ms,
    # ten times a call's own time in the agent.
    agent._wake_relief()
    try:
        agent.read_frames()
        agent.workers.serve_forever()  # the reader role moved on; help with calls
    finally:
        leave(0)

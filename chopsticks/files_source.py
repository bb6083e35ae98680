"""Put's local sources: the bytes of the files being sent, with their SHA-1.

Two ways out: ``file_regions`` for one file (the transport sends it with
sendfile while a thread hashes it) and ``file_chunks`` for the files of a
tree (read ahead and hashed by a thread into a few reused buffers).  The
controller's side only.
"""
import errno
import os
import queue
import threading

from .files_remote import CHUNK, READ_AHEAD, digest, open_file

__all__ = ['file_chunks', 'file_regions']


class _Stopped(Exception):
    pass


def file_chunks(dirs, files, progress):
    """The bytes of ``files`` [(rel, size, (st_dev, st_ino))] below ``dirs``,
    each followed by its SHA-1 digest, packed into CHUNK-sized pieces.

    A helper thread reads and hashes up to READ_AHEAD pieces ahead, so the
    pipe to the host never waits for the hash.  The pieces are views of a few
    reused buffers: each is only valid until the next one is requested
    (``call_stream`` has written it to the transport by then).

    Each file is opened with O_NOFOLLOW and must be the one the walk saw
    (``files_remote.open_file``); errors are OSErrors naming the file.
    """
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for _ in range(READ_AHEAD):
        free.put(_read_ahead_buffer())
    reader = threading.Thread(target=_read_ahead, args=(dirs, files, free, ready),
                              name='chopsticks-read', daemon=True)
    reader.start()
    sent = None
    try:
        while True:
            if sent is not None:
                free.put(sent)  # asked for more: the previous piece has been written
                sent = None
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            buf, length, data_bytes = item
            sent = buf
            yield memoryview(buf)[:length]
            progress.advance(data_bytes)
    finally:
        free.put(None)  # stops the reader if it is still running
        reader.join()


def file_regions(fd, path, size, progress):
    """One open file's bytes as FileRegions, which a pipe transport sends with
    sendfile, then their SHA-1, from a thread that hashes them meanwhile.

    The bytes then never pass through this process on their way out: a
    256 MiB put was 6-7% faster than through _file_chunks (a fresh tunnel
    per put 470 to 507 MB/s, faster in 9 of 10 alternated runs; a warm one
    551 to 584 MB/s, 10 of 10).  The thread reads them for the hash; it
    does not map the file, since a file truncated under a mapping kills
    the process (SIGBUS).  (A read error in sendfile cannot be told from a
    write error: it ends the connection, where _file_chunks' reader raises
    an OSError and the tunnel goes on.)
    """
    from .transport import FileRegion  # the controller's side only, as _read_ahead_buffer
    hasher = _Hasher(fd, size)
    try:
        for offset in range(0, size, CHUNK):
            length = min(CHUNK, size - offset)
            yield FileRegion(fd, offset, length)
            progress.advance(length)
        sha1 = hasher.result()
        if sha1 is None:
            raise _shrank(path)
        yield sha1
    finally:
        hasher.stop()


def _shrank(path):
    return OSError(errno.EIO, 'the file shrank while it was being sent', path)


class _Hasher(object):
    """The SHA-1 of the first ``size`` bytes of ``fd``, computed by a thread."""

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size
        self.digest = None  # None when the file had fewer bytes
        self.error = None  # an OSError reading it
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name='chopsticks-hash', daemon=True)
        self.thread.start()

    def _run(self):
        buf = _read_ahead_buffer()
        hashed = digest()
        offset = 0
        while offset < self.size and not self.stopping:
            try:
                n = os.preadv(self.fd, [buf[:min(CHUNK, self.size - offset)]], offset)
            except OSError as e:
                self.error = e
                return
            if not n:
                return
            hashed.update(buf[:n])
            offset += n
        if offset == self.size:
            self.digest = hashed.digest()

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digest

    def stop(self):
        self.stopping = True
        self.thread.join()


def _read_ahead_buffer():
    """A CHUNK-sized buffer for _read_ahead or _Hasher, 64 bytes into an mmap.

    32-byte aligned, because the kernel copies a file into an unaligned
    address two to three times slower (see wire.aligned_buffer; a
    bytearray's data is 16 bytes into its block, and a fresh process's big
    blocks are fresh mappings); but not at the page's start, because
    writing from there to the pipe, behind the frame's 9-byte header, was
    slow.  Measured here, a tunnel's first 256 MiB put: controller CPU 0.82-0.89
    to 0.74-0.77 s; later puts unchanged.
    """
    from . import wire  # the controller's side only
    return memoryview(wire.aligned_buffer(CHUNK + 64))[64:]


def _read_ahead(dirs, files, free, ready):
    """The reading thread of _file_chunks: fills buffers from ``free`` into ``ready``."""
    def take():
        buf = free.get()
        if buf is None:
            raise _Stopped()
        return buf, memoryview(buf)

    try:
        buf, view = take()
        pos = data = 0
        for rel, size, identity in files:
            hashed = digest()
            fd = open_file(dirs, rel, identity)
            try:
                remaining = size
                while remaining:
                    if pos == CHUNK:
                        ready.put((buf, pos, data))
                        buf, view = take()
                        pos = data = 0
                    n = os.readv(fd, [view[pos:pos + min(remaining, CHUNK - pos)]])
                    if not n:
                        raise _shrank(dirs.path(rel))
                    hashed.update(view[pos:pos + n])
                    pos += n
                    data += n
                    remaining -= n
            finally:
                os.close(fd)
            sha1 = hashed.digest()
            while sha1:
                if pos == CHUNK:
                    ready.put((buf, pos, data))
                    buf, view = take()
                    pos = data = 0
                n = min(len(sha1), CHUNK - pos)
                view[pos:pos + n] = sha1[:n]
                sha1 = sha1[n:]
                pos += n
        if pos:
            ready.put((buf, pos, data))
        ready.put(None)
    except _Stopped:
        pass
    except BaseException as e:
        ready.put(e)

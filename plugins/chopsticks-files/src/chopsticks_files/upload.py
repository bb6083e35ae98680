"""Large content for :func:`chopsticks_files.tasks.file`, from the controller.

Calling ``file`` with the content sends it every time.  ``upload`` first
sends its SHA-256 (one small round trip that also settles owner, group and
mode when the host has the content already), then the content only when the
host lacks it: in the call itself up to ``STREAM_THRESHOLD``, streamed in
chunks with flow control beyond it (as ``chopsticks.files.put`` does).
Standard library only.
"""
import os

from chopsticks_files.tasks import DIFF_LIMIT, file, file_by_digest, file_from_stream

#: Content up to this size travels in one call; larger content streams.
STREAM_THRESHOLD = 4 << 20
_CHUNK = 1 << 20


def upload(tunnel, path, content=None, *, local_path=None, owner=None, group=None, mode=None,
           backup=False, check=False, timeout=None):
    """``file(path, content, ...)`` on the tunnel's host, sending the content only if needed.

    Give ``content`` (str or bytes) or ``local_path`` (a file here, read in
    chunks and never held whole in memory).  Returns ``file``'s result.
    """
    import hashlib  # here: this module is imported on hosts too, which never call upload

    if (content is None) == (local_path is None):
        raise TypeError("upload(%r): give content or local_path, not both or neither" % (path,))
    if content is not None:
        data = content.encode("utf-8", "surrogateescape") if isinstance(content, str) else bytes(content)
        size = len(data)
        sha256 = hashlib.sha256(data).hexdigest()
    else:
        data = None
        local_path = os.fspath(local_path)
        sha256, size = _digest_file(local_path)
    options = dict(owner=owner, group=group, mode=mode, backup=backup, check=check)
    result = tunnel.call(file_by_digest, path, sha256, size, timeout=timeout, **options)
    if not result.get("need_content"):
        return result
    if size <= STREAM_THRESHOLD or (check and size <= DIFF_LIMIT):
        if data is None:
            with open(local_path, "rb") as f:
                data = f.read()
        return tunnel.call(file, path, data, timeout=timeout, **options)
    chunks = _memory_chunks(data) if data is not None else _file_chunks(local_path)
    return tunnel.call_stream(file_from_stream, chunks, path, sha256, size, timeout=timeout,
                              **options)


def _digest_file(path):
    import hashlib

    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _memory_chunks(data):
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        yield bytes(view[start:start + _CHUNK])


def _file_chunks(path):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            yield block

"""Code execnet runs on the remote through ``gateway.remote_exec(module)``.

execnet has no import hook and no function call: a remote program talks over
a channel. The first message says which loop to run.
"""


def serve(channel):
    mode = channel.receive()
    if mode == 'echo':
        for item in channel:
            channel.send(item)
    elif mode == 'put':
        path = channel.receive()
        size = 0
        with open(path, 'wb') as f:
            for chunk in channel:
                if chunk is None:
                    break
                f.write(chunk)
                size += len(chunk)
        channel.send(size)
    elif mode == 'fetch':
        path, chunk_size = channel.receive()
        with open(path, 'rb') as f:
            while True:
                chunk = f.read(chunk_size)
                if not chunk:
                    break
                channel.send(chunk)
        channel.send(None)


if __name__ == '__channelexec__':
    serve(channel)  # noqa: F821 (execnet provides it)

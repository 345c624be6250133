"""Serving a task's files to peers (the protocol: node/tasksync.py): one asyncio server on its own
thread, a token bucket shared by all connections, a bound on connections per address, and each
chunk sent by sendfile from the prepared folder."""

import asyncio
import os
import threading
import time
from collections import Counter

from gossip import wire
from node.tasksync import _REPLY, _REQ, MANIFEST, MAX_PER_PEER, REQUEST_BYTES


class Bucket:
    """Token bucket shared by the server's connections: `rate` bytes/s, bursts of one chunk."""

    def __init__(self, rate, burst):
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, time.monotonic()

    async def take(self, n):
        if not self.rate:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate) - n
        self.t = now
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class Server:
    """Serves one task's files from `folder`; start() binds (port 0: any free one), stop() ends it."""

    def __init__(self, folder, manifest, host="0.0.0.0", port=0, rate=0, per_peer=MAX_PER_PEER):
        self.folder, self.manifest, self.host, self.port = folder, manifest, host, port
        self.files = {f.path: f for f in manifest.files}
        self.bucket, self.per_peer = Bucket(rate, max(f.chunk for f in manifest.files)), per_peer
        self.requests, self.served = Counter(), 0  # chunk requests by path; bytes sent
        self.connections = Counter()
        self._loop = self._thread = self._server = None
        self._ready = threading.Event()
        self._error = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="task-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def stop(self):
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
        self._thread = None

    def _run(self):
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except OSError as e:
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self):
        self._stopping, self._handlers = asyncio.Event(), set()
        server = await asyncio.start_server(self._serve, self.host, self.port, limit=REQUEST_BYTES * 2)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for task in self._handlers:  # connections still open: 3.11's server.close() leaves them
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader, writer):
        peer = writer.get_extra_info("peername")[0]
        self.connections[peer] += 1
        self._handlers.add(asyncio.current_task())
        try:
            if self.connections[peer] > self.per_peer:
                return await self._reply(writer, 1, b"too many connections from one address")
            while True:
                try:
                    (n,) = _REQ.unpack(await reader.readexactly(_REQ.size))
                    if n > REQUEST_BYTES:
                        return await self._reply(writer, 1, b"request too large")
                    request = wire.unpack(await reader.readexactly(n))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except wire.WireError:
                    return await self._reply(writer, 1, b"malformed request")
                status, data = self._answer(request)
                await self.bucket.take(len(data) if isinstance(data, bytes) else data[2])
                await self._reply(writer, status, data)
        except ConnectionError:
            pass
        finally:
            self._handlers.discard(asyncio.current_task())
            self.connections[peer] -= 1
            writer.close()

    def _answer(self, request):
        if not (isinstance(request, list) and len(request) == 3 and isinstance(request[0], str)
                and isinstance(request[1], str) and isinstance(request[2], int)):
            return 1, b"malformed request"
        task, path, index = request
        if task != self.manifest.task:
            return 1, b"not our task"
        if index == MANIFEST:
            return 0, self.manifest.record.encoded
        f = self.files.get(path)
        if f is None or not 0 <= index < len(f.chunks):
            return 1, b"no such chunk"
        self.requests[path] += 1
        return 0, (path, index * f.chunk, min(f.chunk, f.size - index * f.chunk))

    async def _reply(self, writer, status, data):
        """Bytes, or a (path, offset, count) span of a file, which goes by sendfile (no copy through us)."""
        if isinstance(data, bytes):
            writer.write(_REPLY.pack(status, len(data)) + data)
            return await writer.drain()
        path, offset, count = data
        writer.write(_REPLY.pack(status, count))
        with open(os.open(os.path.join(self.folder, path), os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
            sent = await asyncio.get_running_loop().sendfile(writer.transport, f, offset, count)
        self.served += sent
        if sent != count:  # the file shrank under us: the reply is broken, and so is the connection
            raise ConnectionResetError(f"{path} is shorter than its manifest")

"""A TCP proxy with fault modes, for cutting a client off from a server in tests.

It runs its own asyncio loop in a daemon thread, so it works the same for in-process tests
(any event loop) and for multi-process tests (point a child process at ``127.0.0.1:<port>``).

Modes (each call returns once the mode is in effect):

* ``pass_through()`` — forward bytes both ways (initial mode). Leaving ``stall`` releases the
  bytes held meanwhile, so stalled connections resume intact.
* ``stall()`` — a black hole: connections stay open, new ones are accepted, but no byte is
  forwarded in either direction (they are held, not dropped). To the peers it looks like a
  network partition with TCP still up: only timeouts and keepalive pings notice.
* ``reset()`` — abort every connection with a TCP RST and reset new ones as soon as they are
  accepted, until ``pass_through()``: like a crashed server or a firewall REJECT.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

PASS, STALL, RESET = "pass_through", "stall", "reset"


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a RST (SO_LINGER 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``, with fault modes."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port: int = 0
        self.mode = PASS
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._flowing: asyncio.Event | None = None
        # each live connection: (client side, upstream side) -> its two pump tasks
        self._connections: dict[tuple[asyncio.StreamWriter, asyncio.StreamWriter], list[asyncio.Task[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    # -- lifecycle (called from any thread) --------------------------------------------------------

    def start(self) -> TcpProxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.listen_host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._flowing = asyncio.Event()
            self._flowing.set()

            async def serve() -> None:
                self._server = await asyncio.start_server(self._accept, sock=sock)

            self._loop.run_until_complete(serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None
        self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- modes -----------------------------------------------------------------------------------

    def pass_through(self) -> None:
        self._switch(PASS)

    def stall(self) -> None:
        self._switch(STALL)

    def reset(self) -> None:
        self._switch(RESET)

    def _switch(self, mode: str) -> None:
        if self._loop is None:
            raise RuntimeError("proxy not started")
        asyncio.run_coroutine_threadsafe(self._apply(mode), self._loop).result(10)

    async def _apply(self, mode: str) -> None:
        assert self._flowing is not None
        self.mode = mode
        if mode == PASS:
            self._flowing.set()
            return
        self._flowing.clear()
        if mode == RESET:
            for (client, upstream), pumps in list(self._connections.items()):
                _rst(client)
                _rst(upstream)
                for task in pumps:
                    task.cancel()
            self._connections.clear()

    # -- the loop's side -------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for client, upstream in list(self._connections):
            client.transport.abort()
            upstream.transport.abort()
        self._connections.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == RESET:
            _rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _rst(writer)
            return
        if self.mode == RESET:  # switched while connecting
            _rst(writer)
            _rst(up_writer)
            return
        pair = (writer, up_writer)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._connections[pair] = pumps
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            self._connections.pop(pair, None)
            for side in pair:
                if self.mode == RESET:
                    side.transport.abort()
                else:
                    side.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await source.read(65536)
                if not data:
                    return
                await self._flowing.wait()  # bytes read just before a stall are held, not lost
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            return


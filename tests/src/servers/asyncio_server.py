"""An asyncio HTTP server as a Python user would write one for reloader:
asyncio.start_server(..., reuse_port=True), graceful stop on SIGTERM (stop
accepting, finish the connections already accepted). Answers gen=N pid=P."""

import asyncio
import os
import signal
import sys

GENERATION = os.environ.get("RELOADER_GENERATION", "0")


async def handle(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        body = f"gen={GENERATION} pid={os.getpid()}\n".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(host, port):
    handlers = set()

    def connected(reader, writer):
        task = asyncio.ensure_future(handle(reader, writer))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    server = await asyncio.start_server(connected, host, port, reuse_port=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    # Connections accepted in the loop's last turn get their handler on the
    # next ones: let those run, then wait for every handler.
    for _ in range(10):
        await asyncio.sleep(0)
    while handlers:
        await asyncio.wait(set(handlers), timeout=10)


if __name__ == "__main__":
    host, port = sys.argv[1].rsplit(":", 1)
    asyncio.run(main(host, int(port)))

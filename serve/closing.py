"""The last moments of the HTTP listener: connections the kernel has accepted are answered, not reset.

Closing a listening socket resets every connection still in its accept queue, although those
clients have sent their request on what is, for them, an open connection. So the drain keeps a
duplicate of the listening socket, closes the server's own, and answers whatever the queue holds,
and whatever arrives while the drain settles, with ``503`` and ``Connection: close`` (the same
answer a draining keep-alive connection gets), then closes the duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

BODY = json.dumps({"error": "the server is shutting down; retry on another replica"}).encode()
ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
          b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n" % len(BODY)) + BODY
READ_LIMIT = 1 << 16
READ_TIMEOUT_S = 1.0


async def refuse_queued(listener: socket.socket, seconds: float) -> int:
    """Answer every connection accepted on ``listener`` for ``seconds``, then close it; returns how
    many were answered."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    deadline = time.monotonic() + seconds
    answering: list[asyncio.Task] = []
    try:
        while True:
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.002)
                continue
            answering.append(loop.create_task(_answer(connection)))
    finally:
        listener.close()
    if answering:
        await asyncio.gather(*answering, return_exceptions=True)
    return len(answering)


async def _answer(connection: socket.socket) -> None:
    """Read the request head (so the close is a FIN, not a reset over unread bytes), answer 503,
    then read to the client's close."""
    loop = asyncio.get_running_loop()
    connection.setblocking(False)
    with contextlib.closing(connection):
        received = b""
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            while b"\r\n\r\n" not in received and len(received) < READ_LIMIT:
                chunk = await asyncio.wait_for(loop.sock_recv(connection, READ_LIMIT), READ_TIMEOUT_S)
                if not chunk:
                    return
                received += chunk
            await loop.sock_sendall(connection, ANSWER)
            connection.shutdown(socket.SHUT_WR)
            while await asyncio.wait_for(loop.sock_recv(connection, READ_LIMIT), READ_TIMEOUT_S):
                pass

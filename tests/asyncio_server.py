"""A minimal asyncio HTTP server offloading with AsyncClient, for tests:
``python -m tests.asyncio_server HOST PORT FRONTEND``; ``GET /job?s=SECONDS``
runs ``tests.targets:sleep`` and answers the worker's pid."""

import asyncio
import sys
from urllib.parse import parse_qs, urlsplit

from pyramid_powerhose.aio import AsyncClient


async def main(host, port, frontend):
    async with AsyncClient(frontend=frontend, timeout=30) as client:
        async def handle(reader, writer):
            request_line = (await reader.readline()).decode()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # the headers
            query = parse_qs(urlsplit(request_line.split()[1]).query)
            body = await client.execute(query.get("s", ["0"])[0].encode())
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, host, port)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))

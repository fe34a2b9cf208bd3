"""The echo function in Python, written the way the platform docs show: a WebSocket server
on 0.0.0.0, port $PORT (9000 when unset), that echoes every message back."""

import asyncio
import os
import signal

from websockets.asyncio.server import serve


async def echo(websocket):
    async for message in websocket:
        await websocket.send(message)


async def main():
    port = int(os.environ.get("PORT", "9000"))
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(echo, "0.0.0.0", port):
        print(f"echo function listening on 0.0.0.0:{port}", flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main())

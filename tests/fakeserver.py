"""A stand-in worker built only on shmcache.protocol, so the clients can be tested alone.

Run as ``python tests/fakeserver.py SOCKET [--not-ready N]``.  Models (numpy, no ONNX):

* ``add_one``: input ``x`` -> outputs ``y = x + 1`` and ``z = x * 2``; weight version 7.
* ``sleep``: input ``x`` (seconds, scalar) -> sleeps, then ``y = x``; for timeouts.
* ``error:<code>``: answers an error with that code (any string, known or not).

Every request is answered after a random 0-3 ms delay, so pipelined answers come back out of
order.  ``--not-ready N`` answers the first N infer requests with ``not_ready``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
from typing import Any

import numpy as np

from shmcache import errors, protocol

VERSION = 7
MODELS = [
    {
        "name": "add_one",
        "version": VERSION,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", None]}],
        "outputs": [
            {"name": "y", "dtype": "float32", "shape": ["N", None]},
            {"name": "z", "dtype": "float32", "shape": ["N", None]},
        ],
    }
]


class FakeWorker:
    """Per-process state: how many not_ready answers are left, and counters for tests."""

    def __init__(self, not_ready: int) -> None:
        self.not_ready_left = not_ready
        self.not_ready_sent = 0
        self.served = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = protocol.FrameDecoder()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while data := await reader.read(256 * 1024):
                for msg in decoder.feed(data):
                    task = asyncio.create_task(self.answer(msg, writer))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except errors.RemoteError as exc:  # malformed frame: answer with id nil, then close
            writer.write(protocol.encode_frame(protocol.error_reply(None, exc)))
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def answer(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(random.random() * 0.003)
        try:
            request = protocol.parse_request(msg)
        except errors.RemoteError as exc:
            if exc.request_id is None:  # no usable id: the stream is not trustworthy
                writer.write(protocol.encode_frame(protocol.error_reply(None, exc)))
                writer.close()
                return
            reply = protocol.error_reply(exc.request_id, exc)
        else:
            try:
                reply = await self.dispatch(request)
            except errors.RemoteError as exc:
                reply = protocol.error_reply(request.id, exc)
        if not writer.is_closing():
            writer.write(protocol.encode_frame(reply))

    async def dispatch(self, req: protocol.Request) -> dict[str, Any]:
        if req.op == "ping":
            return protocol.ok_ping(
                req.id, self.not_ready_left == 0, served=self.served, not_ready_sent=self.not_ready_sent
            )
        if req.op == "models":
            return protocol.ok_models(req.id, MODELS)
        return await self.infer(req)

    async def infer(self, req: protocol.Request) -> dict[str, Any]:
        assert req.model is not None
        if self.not_ready_left > 0:
            self.not_ready_left -= 1
            self.not_ready_sent += 1
            raise errors.NotReady("warming up")
        if req.model.startswith("error:"):
            code = req.model.split(":", 1)[1]
            if code in errors.ERROR_CLASSES:
                raise errors.ERROR_CLASSES[code](f"fake {code}")
            return {"v": 1, "id": req.id, "ok": False, "error": {"code": code, "message": "odd"}}
        if "x" not in req.inputs:
            raise errors.MissingInput("input 'x' is required")
        x = req.inputs["x"]
        if req.model == "sleep":
            await asyncio.sleep(float(x))
            results = {"y": x}
        elif req.model == "add_one":
            results = {"y": x + np.ones((), x.dtype), "z": x * np.full((), 2, x.dtype)}
        else:
            raise errors.UnknownModel(f"no model {req.model!r}")
        names = req.outputs if req.outputs is not None else list(results)
        for name in names:
            if name not in results:
                raise errors.UnknownOutput(f"no output {name!r}")
        self.served += 1
        return protocol.ok_infer(req.id, VERSION, [(n, results[n]) for n in names])


async def serve(path: str, not_ready: int) -> None:
    if os.path.exists(path):
        os.unlink(path)  # a killed predecessor leaves its socket file behind
    worker = FakeWorker(not_ready)
    server = await asyncio.start_unix_server(worker.handle, path)
    os.chmod(path, 0o600)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--not-ready", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.socket, args.not_ready))


if __name__ == "__main__":
    main()

"""Native memory that grpc.aio keeps per cancelled stream, the way Serve's gRPC data plane cancels them.

Why modelserve ships `RAY_SERVE_USE_GRPC_BY_DEFAULT=0` (serve_app/cli/serve_file.py). Serve's replica
wraps every streaming handler so that a CancelledError is caught and one more message is yielded
(`_wrap_grpc_call` in ray/serve/_private/replica.py), and its router cancels a call while a read is in
flight when the client goes away. Both leak the batch's `grpc_op` array in grpcio (grpc/grpc#43360,
open; fixes proposed in #43361 and #43409), and the scattered leftovers keep glibc from reusing the heap.

This runs both patterns on loopback in one process and prints the bytes glibc still holds in use
(`mallinfo2().uordblks`) per cancelled call, after a warm-up, against the same number of calls that
finish normally. Run it after upgrading grpcio: when `cancelled` is near `completed`, the data plane
can go back on.

    python bench/grpc_cancel_leak.py [--calls 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
from collections.abc import AsyncIterator

import grpc

METHOD = "/probe.Probe/Stream"


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2`; `uordblks` is the bytes allocated and not yet freed."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def heap_in_use() -> int:
    gc.collect()
    return LIBC.mallinfo2().uordblks


async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """Serve's pattern: a cancelled handler catches the cancellation and yields an error message."""
    try:
        yield b"x" * 64
        if request == b"hang":
            await asyncio.sleep(3600)  # a stream the client gives up on
        yield b"x" * 64
    except asyncio.CancelledError:
        yield b"cancelled"


async def one_call(call_stream: grpc.aio.UnaryStreamMultiCallable, cancel: bool) -> None:
    """Read the first message; then cancel while the next read is in flight, or read to the end."""
    call = call_stream(b"hang" if cancel else b"end")
    if cancel:
        async for _ in call:
            break
        call.cancel()
    else:
        async for _ in call:
            pass


async def run(calls: int) -> dict[str, float]:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "probe.Probe", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    grown = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call_stream = channel.unary_stream(METHOD)
        for kind in ("completed", "cancelled"):
            for n in (calls // 4, calls):  # the first batch warms caches and pools up
                before = heap_in_use()
                for _ in range(n):
                    await one_call(call_stream, cancel=kind == "cancelled")
                await asyncio.sleep(0.5)  # let the server see every cancellation
                grown[kind] = heap_in_use() - before
    await server.stop(None)
    return {f"{kind}_bytes_per_call": round(grown[kind] / calls, 1) for kind in grown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    args = parser.parse_args()
    report = {"grpcio": grpc.__version__, "calls": args.calls, **asyncio.run(run(args.calls))}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

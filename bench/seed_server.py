#!/usr/bin/python3
"""Anchor "seed design": the seed's GRPCStdioService on grpc.aio.

This follows the design rpcplugin was started from (a Python
implementation, pyvider-rpcplugin, whose protocol-service reference page
describes it):
an unbounded asyncio.Queue, an async put_line that wraps each line in a
StdioData and puts it on the queue, and a StreamStdio async generator that
yields the queued items.  The seed does not show _stream_items; the loop
below is the simplest one (await queue.get(), yield), which if anything
favours the seed.  The service is registered the way the generated
add_GRPCStdioServicer_to_server does it (a generic handler), on Debian's
python3-grpcio.

    seed_server.py PYDIR ADDR

PYDIR holds protoc's grpc_stdio_pb2.py.  Same command protocol as
rpb_server: prints "LISTEN ADDR PID", then reads GO N SIZE / STATS / STOP
on stdin.  GO runs put_line N times from a task on the event loop (the
seed's put_line is a coroutine, so that is where a host calls it).
"""
import asyncio
import json
import os
import resource
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
from google.protobuf import empty_pb2  # noqa: E402
from grpc_stdio_pb2 import StdioData  # noqa: E402


class GRPCStdioService:
    """The seed's service, as documented."""

    def __init__(self) -> None:
        self._message_queue = asyncio.Queue()
        self._shutdown = False

    async def StreamStdio(self, request, context):
        done = asyncio.Event()

        def on_rpc_done(_):
            done.set()

        context.add_done_callback(on_rpc_done)
        async for item in self._stream_items(done):
            yield item

    async def _stream_items(self, done):
        while not done.is_set() and not self._shutdown:
            item = await self._message_queue.get()
            if item is None:
                break
            yield item

    async def put_line(self, line: bytes, is_stderr: bool = False) -> None:
        try:
            data = StdioData(
                channel=StdioData.STDERR if is_stderr else StdioData.STDOUT,
                data=line)
            await self._message_queue.put(data)
        except Exception:
            pass

    def shutdown(self) -> None:
        self._shutdown = True
        self._message_queue.put_nowait(None)


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def stats() -> str:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return json.dumps({
        "rss_kb": status_kb("VmRSS"), "hwm_kb": status_kb("VmHWM"),
        "maxrss_kb": ru.ru_maxrss, "cpu_user": ru.ru_utime,
        "cpu_sys": ru.ru_stime, "fds": len(os.listdir("/proc/self/fd")) - 1,
        "ctxsw_vol": ru.ru_nvcsw, "ctxsw_invol": ru.ru_nivcsw,
        "t": time.monotonic_ns()})


async def main(addr: str) -> None:
    loop = asyncio.get_running_loop()
    svc = GRPCStdioService()
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("plugin.GRPCStdio", {
        "StreamStdio": grpc.unary_stream_rpc_method_handler(
            svc.StreamStdio,
            request_deserializer=empty_pb2.Empty.FromString,
            response_serializer=StdioData.SerializeToString)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(addr)
    await server.start()
    say("LISTEN %s %d" % (addr, os.getpid()))

    commands: asyncio.Queue = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "STOP")

    threading.Thread(target=reader, daemon=True).start()

    async def produce(n: int, size: int) -> None:
        buf = bytes((ord("a") + k % 26) for k in range(size - 1)) + b"\n"
        t0 = time.monotonic_ns()
        for _ in range(n):
            await svc.put_line(buf)
        t1 = time.monotonic_ns()
        say("PRODUCED %d %d %d 0 0 -" % (t0, t1, n))

    tasks = []
    while True:
        cmd = await commands.get()
        if cmd.startswith("GO "):
            _, n, size = cmd.split()
            tasks.append(asyncio.ensure_future(produce(int(n), int(size))))
        elif cmd == "STATS":
            say("STATS " + stats())
        elif cmd == "STOP":
            break
        elif cmd:
            say("ERR unknown command")
    t0 = time.monotonic_ns()
    svc.shutdown()
    await server.stop(1.0)
    for t in tasks:
        t.cancel()
    say("BYE " + json.dumps({"shutdown_ms": (time.monotonic_ns() - t0) / 1e6}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[2]))

"""Serve the Ticker sample or the NVMe function on a chosen backend (a test/benchmark helper).

    python -m tests.libvfio.serve_device --backend libvfio-user --device nvme --socket S   (from the checkout)

Prints ``serving on S (backend B)`` once the socket exists, then serves until SIGTERM.
With ``--probe P`` it also answers ``alive`` to every connection on the Unix socket P, from
the same event loop: a test asks it whether the loop still runs while a client misbehaves.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from vfio_user.backends import make_server
from vfio_user.client_watch import DEFAULT_DMA_TIMEOUT
from vfio_user.server import new_event_loop
from vfio_user.server_api import ServerBackend


def build_device(kind: str, doorbell: str, ns_size: str):
    if kind == "ticker":
        from vfio_user.sample import Ticker

        return Ticker()
    from nvme_emu.controller import ControllerConfig
    from nvme_emu.function import NvmeFunction
    from nvme_emu.namespace_spec import open_namespace

    config = ControllerConfig(serial="LIBVFIO0001", model="nvme-emu-test", max_io_queues=8)
    return NvmeFunction([open_namespace(f"ram:size={ns_size}", 1, controller_seed=config.serial)], config, doorbell=doorbell)


async def answer_probe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"alive\n")
    try:
        await writer.drain()
    finally:
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    device = build_device(args.device, args.doorbell, args.ns_size)
    kwargs = {"dma_timeout": args.dma_timeout}
    if args.handshake_timeout is not None:
        kwargs["handshake_timeout"] = args.handshake_timeout
    server = make_server(args.backend, device, args.socket, **kwargs)
    probe = await asyncio.start_unix_server(answer_probe, args.probe) if args.probe else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        print(f"serving on {args.socket} (backend {server.backend})", flush=True)
        await stop.wait()
    finally:
        if probe is not None:
            probe.close()
        server.close()
        device.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", required=True, type=ServerBackend)
    p.add_argument("--device", choices=["ticker", "nvme"], default="ticker")
    p.add_argument("--socket", required=True)
    p.add_argument("--doorbell", default="auto")
    p.add_argument("--ns-size", default="64M")
    p.add_argument("--probe", default=None, help="a Unix socket answering 'alive' from the server's loop")
    p.add_argument("--handshake-timeout", type=float, default=None, help="seconds (libvfio-user backend: a stalled client is dropped)")
    p.add_argument("--dma-timeout", type=float, default=DEFAULT_DMA_TIMEOUT, help="seconds a client has to answer DMA_READ/DMA_WRITE")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args))
    finally:
        loop.close()


if __name__ == "__main__":
    main()

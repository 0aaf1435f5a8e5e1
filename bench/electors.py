"""Helper process: N in-process candidates (`service.election.Elector`) on one election prefix.

Used by the failover benchmark for many candidates in one process (each Elector has its own
etcd client and lease, as a replica would). Prints one JSON object per line on stdout:

  {"ev": "ready", "t": ...}                         all `--expect` keys exist under the prefix
  {"ev": "lead", "name": ..., "token": ..., "t": ...}  a candidate became leader (time.time())
  {"ev": "stop", "name": ..., "reason": ..., "t": ...} its term ended

SIGTERM: every elector shuts down as `reminders serve` does (end the term, resign, revoke),
then the process exits. Runs at most `--max-seconds`.

  python -m bench.electors --endpoint http://127.0.0.1:2379 --prefix /bench/x --count 49 \
      --ttl 3 --name follower --expect 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time

from aetcd import rpc
from aetcd.utils import prefix_range_end


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps({**event, "t": event.get("t", time.time())}) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    from service.election import ElectionConfig, Elector
    from service.election.client import call, connect

    electors = []

    def make(name: str) -> Elector:
        async def started(term) -> None:
            emit(ev="lead", name=name, token=term.fencing_token)
            await term.ended.wait()

        async def stopped(term) -> None:
            emit(ev="stop", name=name, reason=term.reason)

        config = ElectionConfig(args.endpoint, name=name, prefix=args.prefix, lease_ttl=args.ttl)
        return Elector(config, on_started_leading=started, on_stopped_leading=stopped, drain_timeout=2.0)

    for index in range(args.count):
        electors.append(make(f"{args.name}-{index:02d}" if args.count > 1 else args.name))
    runs = [asyncio.create_task(elector.run()) for elector in electors]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def ready() -> None:
        config = ElectionConfig(args.endpoint, name="counter", prefix=args.prefix, lease_ttl=args.ttl)
        client = connect(config)
        key = (args.prefix + "/").encode()
        request = rpc.RangeRequest(key=key, range_end=prefix_range_end(key), count_only=True)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and not stop.is_set():
                try:
                    if (await call(client, "Range", "kvstub", request, 2.0)).count >= args.expect:
                        emit(ev="ready")
                        return
                except Exception:  # noqa: BLE001 - etcd not there yet: keep polling
                    pass
                await asyncio.sleep(0.05)
            emit(ev="not-ready")
        finally:
            await client.close()

    if args.expect:
        asyncio.create_task(ready())
    try:
        async with asyncio.timeout(args.max_seconds):
            await stop.wait()
    except TimeoutError:
        pass
    await asyncio.gather(*(elector.shutdown(1.0) for elector in electors), return_exceptions=True)
    for task in runs:
        task.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    emit(ev="exit")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--ttl", type=int, default=3)
    parser.add_argument("--name", default="candidate")
    parser.add_argument("--expect", type=int, default=0, help="print 'ready' once this many keys exist")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    arguments = parser.parse_args()
    if not 1 <= arguments.count <= 200:
        parser.error("--count must be within [1, 200]")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(arguments))

"""HTTP load for a req/s + latency figure: wrk when installed, else an aiohttp generator.

Neither is our telephony client, so the provider's own ceiling measured here is independent of
it. Both print the same JSON fields; `tool` says which one ran. The aiohttp generator runs in a
process of its own (`python -m bench.loadgen ...`), as wrk does, so the load does not share an
event loop with anything it measures.

Requests: `method` on `url`; `ids_file` (one id per line) rotates `{id}` in the URL; `unique_key`
sends a fresh `Idempotency-Key` per request (the provider then places a new call each time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

WRK_SCRIPT = r"""
local method, body, unique, prefix = "%(method)s", %(body)s, %(unique)s, "%(prefix)s"
local template = "%(path)s"
local headers = {["Content-Type"] = "application/json", ["Accept"] = "application/json"}
local ids, n, counter = {}, 0, 0
init = function(args)
  if args[1] then
    for line in io.lines(args[1]) do n = n + 1; ids[n] = line end
  end
end
request = function()
  counter = counter + 1
  local path = template
  if n > 0 then path = string.gsub(template, "{id}", ids[(counter %% n) + 1]) end
  if unique then headers["Idempotency-Key"] = prefix .. counter end
  return wrk.format(method, path, headers, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, ' ..
    '"mean_us": %%.1f, "errors_connect": %%d, "errors_read": %%d, "errors_write": %%d, "errors_status": %%d, ' ..
    '"errors_timeout": %%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _lua_string(text: str | None) -> str:
    if text is None:
        return "nil"
    return "[==[" + text + "]==]"


def have_wrk() -> bool:
    return shutil.which("wrk") is not None and os.environ.get("BENCH_NO_WRK") != "1"


def run_load(
    url: str,
    *,
    method: str = "GET",
    connections: int = 16,
    duration: float = 5.0,
    body: str | None = None,
    unique_key: bool = False,
    ids: list[str] | None = None,
    timeout: float = 10.0,
    tool: str = "auto",
    rate: float | None = None,
) -> dict[str, Any]:
    """One load run; returns {tool, requests, rps, p50_ms, p99_ms, max_ms, errors, ...}.

    `tool`: "auto" (wrk when installed, else aiohttp), "wrk" or "aiohttp". `rate`: requests/s in
    all, paced (the aiohttp generator; wrk sends flat out)."""
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        ids_file = None
        if ids:
            ids_file = Path(tmp) / "ids.txt"
            ids_file.write_text("\n".join(ids) + "\n")
        if rate is None and (tool == "wrk" or (tool == "auto" and have_wrk())):
            return _wrk(url, method, connections, duration, body, unique_key, ids_file, Path(tmp), timeout)
        argv = [sys.executable, "-m", "bench.loadgen", url, "--method", method, "--connections", str(connections),
                "--duration", str(duration), "--timeout", str(timeout)]
        if body is not None:
            argv += ["--body", body]
        if unique_key:
            argv += ["--unique-key"]
        if ids_file:
            argv += ["--ids-file", str(ids_file)]
        if rate is not None:
            argv += ["--rate", str(rate)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False,
                                cwd=Path(__file__).resolve().parents[1])
        if result.returncode != 0:
            raise RuntimeError(f"aiohttp load generator failed: {result.stderr[-2000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def _wrk(url: str, method: str, connections: int, duration: float, body: str | None, unique_key: bool,
         ids_file: Path | None, tmp: Path, timeout: float) -> dict[str, Any]:
    parts = urlsplit(url)
    script = tmp / "load.lua"
    script.write_text(WRK_SCRIPT % {
        "method": method, "body": _lua_string(body), "unique": "true" if unique_key else "false",
        "prefix": f"wrk-{os.getpid()}-{time.monotonic_ns()}-",
        "path": parts.path + (f"?{parts.query}" if parts.query else ""),
    })
    base = f"{parts.scheme}://{parts.netloc}/"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", f"{int(timeout)}s",
            "--latency", "-s", str(script), base]
    if ids_file:
        argv += ["--", str(ids_file)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((row for row in result.stdout.splitlines() if row.startswith("WRKJSON ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout[-1500:]} {result.stderr[-1500:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[f"errors_{kind}"] for kind in ("connect", "read", "write", "status", "timeout"))
    return {
        "tool": "wrk",
        "connections": connections,
        "requests": raw["requests"],
        "duration_s": round(seconds, 3),
        "rps": round(raw["requests"] / seconds, 1),
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p90_ms": round(raw["p90_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
        "max_ms": round(raw["max_us"] / 1000, 2),
        "errors": errors,
        "non_2xx": raw["errors_status"],
    }


# -- the aiohttp generator (its own process) ---------------------------------------------------


async def _aiohttp_load(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    ids = (await asyncio.to_thread(Path(args.ids_file).read_text)).split() if args.ids_file else []
    latencies: list[float] = []
    counter = 0
    errors = non_2xx = 0
    prefix = f"aio-{os.getpid()}-{time.monotonic_ns()}-"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    body = args.body.encode() if args.body is not None else None
    connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        begun = time.perf_counter()
        deadline = begun + args.duration

        async def worker() -> None:
            nonlocal counter, errors, non_2xx
            while time.perf_counter() < deadline:
                counter += 1
                n = counter
                if args.rate:  # paced: request n leaves at n / rate, whichever connection is free
                    await asyncio.sleep(max(0.0, begun + n / args.rate - time.perf_counter()))
                url = args.url.replace("{id}", ids[n % len(ids)]) if ids else args.url
                extra = dict(headers)
                if args.unique_key:
                    extra["Idempotency-Key"] = f"{prefix}{n}"
                started = time.perf_counter()
                try:
                    async with session.request(args.method, url, data=body, headers=extra) as response:
                        await response.read()
                        if not 200 <= response.status < 300:
                            non_2xx += 1
                except (TimeoutError, aiohttp.ClientError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1000

    done = len(latencies)
    return {
        "tool": "aiohttp",
        "connections": args.connections,
        "requests": done,
        "duration_s": round(elapsed, 3),
        "rps": round(done / elapsed, 1),
        "p50_ms": round(pct(50), 2),
        "p90_ms": round(pct(90), 2),
        "p99_ms": round(pct(99), 2),
        "max_ms": round(latencies[-1] * 1000 if latencies else 0.0, 2),
        "errors": errors + non_2xx,
        "non_2xx": non_2xx,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="aiohttp load generator (the fallback when wrk is missing)")
    parser.add_argument("url")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--body", default=None)
    parser.add_argument("--unique-key", action="store_true")
    parser.add_argument("--ids-file", default=None)
    parser.add_argument("--rate", type=float, default=None, help="requests/s in all (paced); default: flat out")
    args = parser.parse_args()
    if not 0 < args.duration <= 120 or not 1 <= args.connections <= 2000:
        parser.error("duration must be in (0, 120] s and connections in [1, 2000]")
    if args.rate is not None and args.rate <= 0:
        parser.error("rate must be above 0 requests/s")
    print(json.dumps(asyncio.run(_aiohttp_load(args))))


if __name__ == "__main__":
    main()

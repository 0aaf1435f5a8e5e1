"""A real provider's fake on a clock of its own, for chaos runs that shorten the provider's windows:

    python -m harness.real_fake telnyx --time-scale 0.2 --port P [the fake's own flags]

The fakes (`reminders_fakes.twilio`, `reminders_fakes.telnyx`) multiply every duration their
provider documents by the control `time_scale` — Telnyx's 60 s `command_id` window, a Dial's
timeout — and the webhook timeout their constructor takes too. Shortening the windows must not
shorten the webhook timeout: this runs the fake with `webhook_timeout` = the documented timeout ÷
the scale (Telnyx 2 s, Twilio 15 s), so that scaled it is the documented one again, and with
`time_scale` set from the start. `/_fake/reset` puts `time_scale` back to 1: the harness sets it
again after each reset (`harness.cluster.RealFakeClient.defaults`).

Twilio's connection overrides (a URL fragment's `rt`, `tt`) are scaled by its fake as well: Twilio
runs are meant at scale 1.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["DOCUMENTED_WEBHOOK_TIMEOUT", "main"]

# seconds each provider waits for a webhook's answer before it gives up (or tries again)
DOCUMENTED_WEBHOOK_TIMEOUT = {"twilio": 15.0, "telnyx": 2.0}


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m harness.real_fake", description=__doc__.splitlines()[0])
    parser.add_argument("provider", choices=sorted(DOCUMENTED_WEBHOOK_TIMEOUT))
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--cps", type=float, default=1.0)
    parser.add_argument("--ring-ms", type=float, default=200.0)
    parser.add_argument("--account-sid")
    parser.add_argument("--auth-token")
    parser.add_argument("--api-key")
    parser.add_argument("--connection-id")
    args = parser.parse_args(argv)
    if not args.time_scale > 0:
        parser.error("--time-scale must be positive")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s fake-{args.provider}: %(message)s")
    common = {"latency_ms": args.latency_ms, "calls_per_second": args.cps, "ring_ms": args.ring_ms,
              "webhook_timeout": DOCUMENTED_WEBHOOK_TIMEOUT[args.provider] / args.time_scale}
    if args.provider == "twilio":
        from reminders_fakes.twilio import FakeTwilio

        fake: Any = FakeTwilio(account_sid=args.account_sid, auth_token=args.auth_token, **common)
    else:
        from reminders_fakes.telnyx import FakeTelnyx

        fake = FakeTelnyx(api_key=args.api_key, connection_id=args.connection_id, **common)
    fake.controls.time_scale = args.time_scale
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()

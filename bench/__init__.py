"""Benchmarks of the reminder service, each against a baseline measured in the same run.

`python -m bench` (or `make bench`) runs everything and regenerates BENCHMARKS.md;
`python -m bench dispatch|failover|api|micro|report [--quick]` runs one part;
`python -m bench dispatch --events` the dispatch rate without events delivery, with an accepting and
with a stalled receiver (bench/events.py); `python -m bench provider --mode twilio|telnyx` a real
provider's calls and their webhooks beside a GET and the generic path (bench/provider.py). Results are JSON files
in bench/results/. Nothing here is part of the test suite: timings are never asserted.
"""

"""Fake telephony providers, shipped for the demo, the tests and the k8s demo deployment.

Apart from the real adapters in `service.telephony`: nothing in the service's runtime path
imports this package. `generic` is the JSON calls API of DESIGN.md; the Twilio- and Telnyx-shaped
fakes are `service.fakes.twilio` and `service.fakes.telnyx`.
"""

from service.fakes.generic import DEFAULT_MAX_ENTRIES, FakeProvider, create_fake_provider, run_fake_provider

__all__ = ["DEFAULT_MAX_ENTRIES", "FakeProvider", "create_fake_provider", "run_fake_provider"]

"""Fake telephony providers for the demo, the tests and the k8s demo deployment.

A distribution of their own (`reminders-fakes`, fakes/pyproject.toml), apart from the service: the
service's wheel and production image never contain them (the Telnyx-shaped fake signs with a
fixed, published private key). `generic` is the JSON calls API of docs/DESIGN.md; the Twilio- and
Telnyx-shaped fakes are `reminders_fakes.twilio` and `reminders_fakes.telnyx`. They use the
service's own rules (`service.privacy.E164`, the domain's call states) rather than restating them.
"""

from reminders_fakes.generic import DEFAULT_MAX_ENTRIES, FakeProvider, create_fake_provider, run_fake_provider

__all__ = ["DEFAULT_MAX_ENTRIES", "FakeProvider", "create_fake_provider", "run_fake_provider"]

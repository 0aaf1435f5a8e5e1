"""Fake providers for tests and the demo, apart from the shipped adapters."""

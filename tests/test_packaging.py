"""The fake providers stay out of the product: the service's wheel and its production image carry
no fake and no private key; the fakes are a distribution of their own (fakes/), which
`reminders fake-provider` loads where it is installed and names where it is not; the service
refuses the fake's public key unless TELNYX_API_URL is loopback (tests/test_telnyx_webhooks.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from reminders_fakes.telnyx import TEST_PUBLIC_KEY, TEST_SIGNING_SEED
from service.cli import FAKES_MISSING, main
from service.providers.telnyx import FAKE_TELNYX_PUBLIC_KEY

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
FAKE_NAMES = {"fakes", "reminders_fakes"}


# --- the service's wheel -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service's wheel, built from a copy of the checkout (a build in place would leave build/
    behind, whose stale files a later build would package) with the backend pyproject.toml names."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "checkout"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".run", "*.db*",
    ))
    out = tmp / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "--disable-pip-version-check", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (
        f"building the wheel failed (setuptools>=70.1 comes with the dev extra: make install)\n"
        f"{result.stdout}\n{result.stderr}"
    )
    (built,) = out.glob("reminders-*.whl")
    return built


def test_the_wheel_holds_the_service_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {PurePosixPath(name).parts[0] for name in names}
    others = [top for top in tops if top != "service"]
    assert "service" in tops and len(others) == 1 and re.fullmatch(r"reminders-[\w.]+\.dist-info", others[0]), tops
    assert "service/cli.py" in names and "service/providers/telnyx/rest.py" in names
    faked = [name for name in names if FAKE_NAMES & set(PurePosixPath(name).parts)]
    assert not faked, f"the wheel ships fakes: {faked}"


def test_no_file_of_the_wheel_holds_the_fakes_private_key(wheel: Path) -> None:
    needles = [TEST_SIGNING_SEED, TEST_SIGNING_SEED.hex().encode(), b"TEST_SIGNING_SEED"]
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            content = archive.read(name)
            found = [n for n in needles if n.lower() in content.lower()]
            assert not found, f"{name} holds {found}"


def test_the_service_knows_the_fakes_public_key_only() -> None:
    """The constant the service refuses beyond loopback is the fake's public key, not restated wrong."""
    assert FAKE_TELNYX_PUBLIC_KEY == TEST_PUBLIC_KEY
    config = (ROOT / "service" / "config.py").read_text()
    assert TEST_SIGNING_SEED.hex() not in config.lower()


# --- `reminders fake-provider` without the fakes ------------------------------------------------


def test_fake_provider_says_what_to_install_where_the_fakes_are_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "reminders_fakes", None)  # import reminders_fakes: ModuleNotFoundError
    assert main(["fake-provider", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err == FAKES_MISSING + "\n"
    assert err.startswith("reminders fake-provider: ") and "pip install ./fakes" in err


def test_fake_provider_without_the_fakes_prints_one_line_and_exits_2() -> None:
    """As a user sees it: one line on stderr, no traceback, exit status 2."""
    block = (
        "import sys; sys.modules['reminders_fakes'] = None; "
        "from service.cli import main; sys.exit(main(['fake-provider']))"
    )
    result = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [FAKES_MISSING] and not result.stdout


def test_a_broken_fakes_install_is_not_reported_as_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "reminders_fakes"
    package.mkdir()
    (package / "__init__.py").write_text("import a_dependency_that_is_not_installed\n")
    for name in [n for n in sys.modules if n == "reminders_fakes" or n.startswith("reminders_fakes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        main(["fake-provider"])


# --- the Dockerfile: the production image never sees fakes/ -------------------------------------


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name (or its index) -> its (INSTRUCTION, rest), continuation lines joined, comments
    dropped; in order, the last being the default target."""
    logical, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: dict[str, list[tuple[str, str]]] = {}
    name = ""
    for text in logical:
        op, _, rest = text.partition(" ")
        if op.upper() == "FROM":
            match = re.search(r"\s+AS\s+(\S+)\s*$", rest, re.I)
            name = match[1] if match else str(len(stages))
            stages[name] = []
        stages[name].append((op.upper(), rest.strip()))
    return stages


def _needs(stages: dict[str, list[tuple[str, str]]], target: str) -> list[str]:
    """`target` and every stage it builds on (FROM <stage>, COPY --from=<stage>)."""
    needed, todo = [], [target]
    while todo:
        stage = todo.pop()
        if stage in needed:
            continue
        needed.append(stage)
        for op, rest in stages[stage]:
            if op == "FROM" and rest.split()[0] in stages:
                todo.append(rest.split()[0])
            found = re.search(r"--from=(\S+)", rest) if op == "COPY" else None
            if found and found[1] in stages:
                todo.append(found[1])
    return needed


def _context_sources(stages: dict[str, list[tuple[str, str]]], names: list[str]) -> set[str]:
    """What those stages COPY (or ADD) from the build context."""
    sources = set()
    for stage in names:
        for op, rest in stages[stage]:
            if op in ("COPY", "ADD") and "--from=" not in rest:
                *srcs, _dest = [part for part in rest.split() if not part.startswith("--")]
                sources |= {src.rstrip("/") for src in srcs}
    return sources


def test_the_production_image_copies_nothing_from_fakes() -> None:
    stages = _stages()
    production = _needs(stages, list(stages)[-1])  # `docker build .` builds the last stage
    assert "demo" not in production and "demo-builder" not in production, production
    sources = _context_sources(stages, production)
    assert sources == {"requirements/runtime.txt", "pyproject.toml", "service", "alembic.ini", "migrations"}, sources
    text = " ".join(rest for stage in production for _op, rest in stages[stage])
    assert not FAKE_NAMES & set(re.findall(r"[\w.-]+", text.replace("/", " "))), "a production stage names the fakes"


def test_the_demo_target_installs_the_fakes() -> None:
    stages = _stages()
    assert "demo" in stages and list(stages)[-1] != "demo", "`--target demo` is a stage, never the default"
    demo = _needs(stages, "demo")
    assert {"fakes"} <= {source.split("/")[0] for source in _context_sources(stages, demo)}
    runs = " ".join(rest for stage in demo for op, rest in stages[stage] if op == "RUN")
    assert re.search(r"pip .*install .*\./fakes", runs)
    cmd = [rest for op, rest in stages["demo"] if op == "CMD"]
    assert cmd and '"fake-provider"' in cmd[-1]


def test_dockerignore_lets_in_only_what_the_stages_copy() -> None:
    """Everything is excluded but what a stage copies; fakes/ only for the demo target's stages."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "*", "the context starts empty"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    stages = _stages()
    production = _needs(stages, list(stages)[-1])
    demo_only = [stage for stage in _needs(stages, "demo") if stage not in production]
    in_production = _context_sources(stages, production)
    in_demo = _context_sources(stages, demo_only)
    assert {a for a in allowed if a.split("/")[0] not in FAKE_NAMES} == in_production
    fakes_allowed = {a for a in allowed if a.split("/")[0] in FAKE_NAMES}
    assert fakes_allowed and all(a.split("/")[0] in in_demo for a in fakes_allowed), (fakes_allowed, in_demo)
    assert not in_production & {a.split("/")[0] for a in fakes_allowed}

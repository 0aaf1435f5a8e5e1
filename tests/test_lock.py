"""The lock files (requirements/runtime.txt for the image, requirements/dev.txt for `make install`,
both from `make lock`): every package pinned with hashes, every requirement of pyproject.toml (and
of the fakes, and both build backends) pinned at a version it accepts, the runtime's versions the
ones the tests run; the Dockerfile and `make install` install from them with --require-hashes and
add the local packages with --no-deps. Offline: what pip does with them is `make install` itself."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
RUNTIME, DEV = ROOT / "requirements" / "runtime.txt", ROOT / "requirements" / "dev.txt"
LOCAL = {"reminders", "reminders-fakes"}  # installed from the checkout, never from the lock
# The image and the dev machines: Linux, CPython 3.11.
ENVIRONMENT = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11",
               "python_full_version": "3.11.7", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "platform_machine": "x86_64", "os_name": "posix"}


def _pins(path: Path) -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes), for every requirement the lock file holds."""
    text = path.read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith(("-e", "-r", "-c", "--", ".", "/")), f"{path.name}: {line}: not a pinned package"
        spec, *hashes = line.split(" --hash=")
        requirement = Requirement(spec)
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"{path.name}: {spec} is not pinned"
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h.strip()) for h in hashes), f"{spec}: hashes"
        pins[canonicalize_name(requirement.name)] = (Version(pin.version), len(hashes))
    return pins


def _toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _wanted(requirements: list[str], pins: dict[str, tuple[Version, int]], lock: Path) -> None:
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name in LOCAL or (requirement.marker and not requirement.marker.evaluate(ENVIRONMENT)):
            continue
        assert name in pins, f"{text}: not in {lock.relative_to(ROOT)} (run `make lock`)"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{text}: {lock.relative_to(ROOT)} pins {version} (run `make lock`)")


def test_the_runtime_lock_pins_every_dependency_and_the_build_backend_with_hashes() -> None:
    project = _toml(ROOT / "pyproject.toml")
    pins = _pins(RUNTIME)
    _wanted(project["project"]["dependencies"], pins, RUNTIME)
    _wanted(project["build-system"]["requires"], pins, RUNTIME)
    # the fakes (the demo image) add their package only: their dependencies are the service's
    fakes = _toml(ROOT / "fakes" / "pyproject.toml")
    _wanted([*fakes["project"]["dependencies"], *fakes["build-system"]["requires"]], pins, RUNTIME)
    assert not {canonicalize_name(n) for n in LOCAL} & set(pins)
    dev_only = {canonicalize_name(Requirement(r).name) for r in project["project"]["optional-dependencies"]["dev"]}
    assert not (dev_only - {"setuptools"}) & set(pins), "test tools in the image's lock"


def test_the_dev_lock_pins_the_dev_extra_and_the_fakes_at_the_runtime_versions() -> None:
    project = _toml(ROOT / "pyproject.toml")
    runtime, dev = _pins(RUNTIME), _pins(DEV)
    _wanted([*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["dev"]], dev, DEV)
    _wanted(_toml(ROOT / "fakes" / "pyproject.toml")["project"]["dependencies"], dev, DEV)
    differ = {name: (runtime[name][0], dev[name][0]) for name in runtime if runtime[name][0] != dev[name][0]}
    assert not differ, f"the tests would run other versions than the image ships: {differ} (run `make lock`)"
    assert "uv" in dev, "`make lock` runs the dev lock's uv"


def _logical_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_installs_the_lock_with_hashes_then_the_service_without_dependencies() -> None:
    runs = [line for line in _logical_lines(ROOT / "Dockerfile") if line.startswith(("RUN", "COPY"))]
    pip_installs = [line for line in runs if "pip install" in line]
    locked = [i for i, line in enumerate(runs) if "pip install" in line and "-r requirements/runtime.txt" in line]
    assert locked and "--require-hashes" in runs[locked[0]], pip_installs
    service_copied = next(i for i, line in enumerate(runs) if line.startswith("COPY service/"))
    assert locked[0] < service_copied, "the lock's layer is built before the code's"
    for line in pip_installs:
        if "-r requirements/" not in line:
            # a local package: its dependencies are the lock's, its backend the lock's setuptools
            assert "--no-deps" in line and "--no-build-isolation" in line, line
    for line in _logical_lines(ROOT / ".dockerignore"):
        assert line != "!requirements/dev.txt", "the dev lock has no business in the build context"


def test_make_install_installs_the_dev_lock_with_hashes_then_the_local_packages() -> None:
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    stamp = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert stamp and "$(DEV_LOCK)" in stamp[1], "`make install` runs again when the lock changes"
    recipe = stamp[2]
    assert re.search(r"pip install .*--require-hashes -r \$\(DEV_LOCK\)", recipe)
    assert re.search(r"pip install .*--no-deps .*-e \. -e \./fakes", recipe)
    assert "--upgrade" not in recipe, "nothing outside the lock"
    assert re.search(r"^DEV_LOCK := requirements/dev\.txt$", makefile, re.M)
    lock = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert lock and "$(RUNTIME_LOCK)" in lock[1] and "$(DEV_LOCK)" in lock[1]


@pytest.mark.parametrize("lock", [RUNTIME, DEV], ids=lambda p: p.name)
def test_every_pin_carries_hashes(lock: Path) -> None:
    pins = _pins(lock)
    assert len(pins) > 20 and all(count >= 1 for _, count in pins.values())

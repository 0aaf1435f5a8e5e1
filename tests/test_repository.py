"""The repository holds its own contract: no file refers outside it (a sibling folder, a path on
some machine), and every design page it names is its own docs/DESIGN.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the sibling folder the project began from, named in pieces so that this file does not refer to it
_SIBLING = "sh" + "ared"
_OUTSIDE = re.compile(rf"\.\./{_SIBLING}|(?<![\w.-]){_SIBLING}/(DESIGN|ETCD-NOTES|TOOLING-NOTES)")
# a run's temporary directory (a chaos cluster's logs, pytest's, tempfile's): gone in a clone
_RUN_DIR = re.compile(r"/tmp/(cluster-|pytest-of-|tmp)[\w-]+")
_DESIGN = re.compile(r"(?<![\w./-])(?!docs/)[\w./-]*DESIGN\.md")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = []
    for name in filter(None, listed):
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" not in data[:4096]:
            files.append(path)
    return files


def test_the_contract_is_in_the_repository() -> None:
    assert (ROOT / "docs/DESIGN.md").is_file()


def test_no_file_refers_outside_the_repository() -> None:
    # this checkout's path, and its parent's unless that is a place for everyone's files (a clone in
    # /tmp must not make every `/tmp/…` a path of this machine)
    shared_places = {Path("/"), Path("/tmp"), Path("/var/tmp"), Path.home()}
    machine_paths = {f"{ROOT}/"} | ({f"{ROOT.parent}/"} if ROOT.parent not in shared_places else set())
    found = []
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line) or _RUN_DIR.search(line) or any(prefix in line for prefix in machine_paths):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert found == []


def test_every_design_page_named_is_docs_design() -> None:
    found = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in _DESIGN.finditer(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
    assert found == []

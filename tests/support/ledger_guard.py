"""Who writes the state the promise rests on: the ledger only (service/ledger/).

Two checks. `static_writes(source)` reads a module of `service/` and names every insert, update or
delete of `reminders`, `call_attempts` or the events' outbox (`events`, `event_feed`: an event is
written with the change it reports) in it — by Core (`insert/update/delete(...)` of the ORM
class, its table or a name bound to either), by the ORM (constructing a `Reminder`, `CallAttempt`,
`Event` or `EventFeed`, loading whole entities to change them) or by raw SQL in a string. `RuntimeGuard`
watches every statement the suite's own processes send and records one of those writes made from
a module of `service/` outside the ledger (test code, the harness and migrations may write: they
set up data).
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import greenlet
from sqlalchemy import event
from sqlalchemy.engine import Engine

__all__ = ["GUARD", "PROTECTED_TABLES", "RuntimeGuard", "static_writes"]

PROTECTED_TABLES = ("reminders", "call_attempts", "events", "event_feed")
_MODELS = frozenset({"Reminder", "CallAttempt", "Event", "EventFeed"})
_DML = re.compile(r"(?is)\b(insert\s+into|update|delete\s+from)\s+[\"'`\[]?"
                  r"(reminders|call_attempts|events|event_feed)\b")
_CONFIRMATION = re.compile(r"(?is)\bupdate\s+[\"'`]?appointments\b.*\bset\b.*\bconfirmation\b")
_WRITERS = frozenset({"insert", "update", "delete"})
_TEST_UPDATE = re.compile(r"(?is)^\s*update\s+[\"'`]?reminders\b")


def _mentions(node: ast.AST, names: set[str]) -> bool:
    """`node` refers to a protected table: by a protected name, or by its table name looked up
    (`metadata.tables["reminders"]`, `table("reminders")`)."""
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and child.id in names:
            return True
        if isinstance(child, ast.Subscript | ast.Call):
            keys = [child.slice] if isinstance(child, ast.Subscript) else child.args
            if any(isinstance(key, ast.Constant) and key.value in PROTECTED_TABLES for key in keys):
                return True
    return False


def _protected_names(tree: ast.AST) -> set[str]:
    """The model classes and every name bound (at any depth, to a fixpoint) to an expression
    that mentions them or a protected table's name: `_R = Reminder.__table__`, aliases of aliases."""
    names = set(_MODELS)
    assignments = [node for node in ast.walk(tree) if isinstance(node, ast.Assign | ast.AnnAssign)]
    while True:
        before = len(names)
        for node in assignments:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            if value is None:
                continue
            for target in targets:
                if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                    pairs = zip(target.elts, value.elts, strict=False)
                else:
                    pairs = [(target, value)]
                for name, expression in pairs:
                    if isinstance(name, ast.Name) and _mentions(expression, names):
                        names.add(name.id)
        if len(names) == before:
            return names


def static_writes(source: str, filename: str = "<source>") -> list[str]:
    """Each write of a protected table in `source`, as "file:line: what"."""
    tree = ast.parse(source, filename)
    protected = _protected_names(tree)
    found: list[str] = []

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _DML.search(node.value) or _CONFIRMATION.search(node.value):
                hit(node, "raw SQL writing a protected table")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        arguments = [*node.args, *(keyword.value for keyword in node.keywords)]
        if name in _WRITERS and any(_mentions(argument, protected) for argument in arguments):
            hit(node, f"{name}() of a protected table")
        elif name in _WRITERS and isinstance(func, ast.Attribute) and _mentions(func.value, protected):
            hit(node, f".{name}() of a protected table")
        elif isinstance(func, ast.Name) and func.id in _MODELS:
            hit(node, f"an ORM {func.id} object made (to add it)")
        elif name in ("get", "query", "merge", "select") and any(
                isinstance(argument, ast.Name) and argument.id in _MODELS for argument in node.args):
            hit(node, f"{name}() of whole {'/'.join(_MODELS)} entities (ORM writes follow)")
    return found


_ROOT = Path(__file__).resolve().parents[2]
_EXEMPT = tuple(str(_ROOT / folder) + "/" for folder in ("tests", "harness", "bench", "migrations", "fakes"))
_SERVICE = str(_ROOT / "service") + "/"
_ENGINE = str(_ROOT / "service" / "db" / "engine.py")


def _caller_file() -> str | None:
    """The file of the first frame of the project on the stack that sent the statement — found
    through greenlets (SQLAlchemy's asyncio runs it in a child of the caller's) —, with its
    module's name for a module of `service`; None when nothing of the project did."""
    frame = sys._getframe(3)
    current = greenlet.getcurrent()
    while True:
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(_EXEMPT):
                return filename
            if filename.startswith(_SERVICE) and filename != _ENGINE:
                return frame.f_globals.get("__name__", filename)
            frame = frame.f_back
        current = current.parent
        if current is None:
            return None
        frame = current.gr_frame


def _caller_module() -> str | None:
    """The module of `service` that sent the statement; None when a test, the harness, the bench
    or a migration sent it (they set up data) or nothing of the project did."""
    caller = _caller_file()
    return None if caller is None or caller.startswith(_EXEMPT) else caller


@dataclass
class RuntimeGuard:
    """Records writes of protected tables sent from `service` modules outside the ledger."""

    violations: list[str] = field(default_factory=list)
    # a test (or the harness) changed reminders itself: a status it wrote made no event
    tests_changed_reminders: bool = False

    def install(self) -> None:
        event.listen(Engine, "before_cursor_execute", self._before)

    def _before(self, _conn, _cursor, statement: str, _params, _context, _many) -> None:
        if not (_DML.search(statement) or _CONFIRMATION.search(statement)):
            return
        if _TEST_UPDATE.search(statement) and (_caller_file() or "").startswith(_EXEMPT):
            self.tests_changed_reminders = True
            return
        module = _caller_module()
        if module is not None and not module.startswith("service.ledger"):
            self.violations.append(f"{module}: {' '.join(statement.split())[:120]}")


# The suite's one guard, installed by tests/conftest.py for every test of this process.
GUARD = RuntimeGuard()

"""A pool directory's small JSON records (pool.json, names.json), each kept in two copies.

Losing or damaging one file must lose nothing, so every record is written twice: ``names.json``
and ``names.copy.json``, ``pool.json`` and ``pool.copy.json`` (:func:`thinpool.paths.copy_of`).

* :func:`write` replaces the primary, then the copy, each atomically (a temp file in the same
  directory, fsync, rename), then fsyncs the directory once. So each file is always either its old
  or its new version, never a mix; and since the primary is written first, when the two differ
  after a crash the primary is the newer one. An ``OSError`` is raised as it came (the callers
  type it) and the temp file is removed; a failure on the copy leaves the primary written.
* :func:`read` reads both and returns the primary's document if it is intact, else the copy's,
  else None, with one :class:`Problem` per copy that is missing or damaged (each names its file).
  ``check(doc)`` is the caller's parser: it raises ``ValueError``, ``KeyError``, ``TypeError``
  or ``AttributeError`` for a document it does not accept, which makes that copy damaged.
* Documents carry ``"copies": 2``. A pool written by an older version kept one file: its missing
  copy is no problem (:attr:`Read.legacy`); the next write adds it.
* :func:`preserve` moves a damaged copy aside (``<name>.damaged``, or ``.damaged.N`` when that is
  taken) before a write replaces it, so no damaged record is ever overwritten.

Costs: two small reads per :func:`read`; two file fsyncs and one directory fsync per
:func:`write`. Nothing here prints.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from .paths import copy_of

_BAD = (ValueError, KeyError, TypeError, AttributeError)


@dataclass
class Problem:
    """One copy of a record that cannot be used."""

    path: str
    what: str              # "missing" or "damaged"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path} is {self.what}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Read:
    doc: dict | None                 # the document in use (None: no copy is intact)
    source: str | None               # the file it came from
    problems: list[Problem] = field(default_factory=list)
    #: Both copies are intact but differ (a write was interrupted between them): the next write
    #: brings the copy in line. Not a problem.
    differs: bool = False
    #: Only the primary exists and it was written by a version that kept one copy.
    legacy: bool = False

    @property
    def damaged(self) -> list[Problem]:
        return [p for p in self.problems if p.what == "damaged"]


def _load_one(path: str, check: Callable[[dict], None]) -> tuple[dict | None, Problem | None]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None, Problem(path, "missing")
    except OSError as e:
        return None, Problem(path, "damaged", f"cannot be read: {e.strerror or e}")
    except ValueError as e:
        return None, Problem(path, "damaged", f"not JSON: {e}")
    if not isinstance(doc, dict):
        return None, Problem(path, "damaged", "not a JSON object")
    try:
        check(doc)
    except _BAD as e:
        return None, Problem(path, "damaged", str(e) or type(e).__name__)
    return doc, None


def read(path, check: Callable[[dict], None]) -> Read:
    """Both copies of record ``path``; see the module docstring."""
    path = os.fspath(path)
    second = copy_of(path)
    a, pa = _load_one(path, check)
    b, pb = _load_one(second, check)
    problems = [p for p in (pa, pb) if p is not None]
    if a is not None:
        if pb is not None and pb.what == "missing" and a.get("copies") != 2:
            return Read(a, path, legacy=True)
        return Read(a, path, problems, differs=b is not None and _comparable(a) != _comparable(b))
    if b is not None:
        return Read(b, second, problems)
    return Read(None, None, problems)


def _comparable(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "copies"}


def write(path, doc: dict) -> None:
    """Replace both copies of record ``path`` with ``doc`` (see the module docstring)."""
    path = os.fspath(path)
    doc = {**doc, "copies": 2}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    d = os.path.dirname(os.path.abspath(path))
    for target in (path, copy_of(path)):
        _replace(target, d, text)
    sync_dir(d)


def replace_file(path, text: str) -> None:
    """Replace the one file ``path`` with ``text`` atomically and durably (temp file, fsync,
    rename, directory fsync): a crash leaves the old file or the new one."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    _replace(path, d, text)
    sync_dir(d)


def sync_dir(d: str) -> None:
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _replace(target: str, d: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def preserve(problems: list[Problem]) -> list[str]:
    """Move every damaged copy in ``problems`` aside; returns one note per file moved."""
    notes = []
    for p in problems:
        if p.what != "damaged" or not os.path.exists(p.path):
            continue
        dest = p.path + ".damaged"
        n = 1
        while os.path.exists(dest):
            dest = f"{p.path}.damaged.{n}"
            n += 1
        os.replace(p.path, dest)
        notes.append(f"the damaged {os.path.basename(p.path)} was kept as {dest}")
    return notes

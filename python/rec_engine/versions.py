"""Model versions on disk: a *model home* folder holding bundles side by side and a pointer to the one served.

::

    models/                      the home
        CURRENT                  the name of the served bundle (one line), replaced atomically
        HISTORY                  the names promoted so far, oldest first (one per line): rollback's memory
        v1/ v2/ ...              bundles

:class:`~rec_engine.engine.Engine` ``.load(home)`` follows ``CURRENT``; :func:`promote` points it at another
bundle (the offline update's last step), :func:`rollback` back at the one promoted before. The pointer is
written to a temporary file, fsynced and renamed over the old one, so a reader sees the old or the new
name, never a torn one, and a power loss keeps one of the two.
"""
from __future__ import annotations

import os
from pathlib import Path

from .bundle import BundleError

CURRENT, HISTORY = "CURRENT", "HISTORY"


def is_home(path) -> bool:
    """Whether ``path`` is a model home (a folder with a ``CURRENT`` pointer and no manifest of its own)."""
    path = Path(path)
    return (path / CURRENT).is_file() and not (path / "manifest.json").exists()


def _name_ok(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\n" not in name


def resolve(path) -> Path:
    """The bundle that ``path`` names: ``path`` itself, or the bundle its ``CURRENT`` pointer names."""
    path = Path(path)
    if not is_home(path):
        return path
    name = (path / CURRENT).read_text(encoding="utf-8").strip()
    if not _name_ok(name):
        raise BundleError(f"{path / CURRENT}: not a bundle name ({name!r})")
    target = path / name
    if not (target / "manifest.json").exists():
        raise BundleError(f"{path / CURRENT} points at {name!r}, which is not a bundle in {path}")
    return target


def current(home) -> str | None:
    """The name ``CURRENT`` holds (None before the first promotion)."""
    p = Path(home) / CURRENT
    return p.read_text(encoding="utf-8").strip() if p.is_file() else None


def history(home) -> list[str]:
    """The names promoted, oldest first."""
    p = Path(home) / HISTORY
    return [x for x in p.read_text(encoding="utf-8").split("\n") if x] if p.is_file() else []


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)                     # the rename itself survives a power loss
    finally:
        os.close(fd)


def promote(home, name: str) -> None:
    """Point ``home/CURRENT`` at the bundle ``home/name`` and append it to the history."""
    home = Path(home)
    if not isinstance(name, str) or not _name_ok(name):
        raise ValueError(f"a version is a folder name inside the home, got {name!r}")
    if not (home / name / "manifest.json").exists():
        raise BundleError(f"{home / name} is not a bundle")
    names = history(home)
    cur = current(home)
    if cur is not None and (not names or names[-1] != cur):
        names.append(cur)                    # a home made by hand: its first version is history too
    names.append(name)
    _write_atomic(home / HISTORY, "\n".join(names) + "\n")
    _write_atomic(home / CURRENT, name + "\n")


def rollback(home) -> str:
    """Point ``CURRENT`` back at the version promoted before the current one; returns its name. The
    rolled-back version leaves the history (a second rollback goes one further back)."""
    home = Path(home)
    names = history(home)
    cur = current(home)
    if cur is None:
        raise BundleError(f"{home} has no {CURRENT} pointer: nothing to roll back")
    while names and names[-1] == cur:
        names.pop()
    if not names:
        raise BundleError(f"{home}: no version before {cur!r} to roll back to")
    prev = names[-1]
    if not (home / prev / "manifest.json").exists():
        raise BundleError(f"{home}: the previous version {prev!r} is gone")
    _write_atomic(home / HISTORY, "\n".join(names) + "\n")
    _write_atomic(home / CURRENT, prev + "\n")
    return prev

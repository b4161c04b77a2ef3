"""What every harness shares: the exception policy and the record of findings.

A harness calls :func:`guard` around one fuzz input. A Python exception of an allowed type is the
documented answer to bad input and is fine; any other exception is a finding: it is re-raised, which
makes atheris stop and write the input (``crash-<sha1>``) that reproduces it. A native crash (segfault,
ASan/UBSan report) stops the process by itself, also writing the input.

``FUZZ_KEEP_GOING=1`` records an unexpected exception in ``$FUZZ_FINDINGS`` (one line per distinct
type + raising frame) instead of stopping: a long run then lists every distinct finding, not the first.
"""
from __future__ import annotations

import os
import sys
import traceback

KEEP_GOING = os.environ.get("FUZZ_KEEP_GOING") == "1"
FINDINGS = os.environ.get("FUZZ_FINDINGS")
_seen: set[str] = set()


def signature(e: BaseException) -> str:
    """The exception's type and the innermost frame inside rec_engine (else the innermost of all)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "rec_engine" in f.filename and "/fuzz/" not in f.filename] or frames
    f = ours[-1] if ours else None
    where = f"{os.path.relpath(f.filename)}:{f.lineno} in {f.name}" if f else "?"
    return f"{type(e).__name__} at {where}: {' '.join(str(e).split())[:160]}"


def unexpected(e: BaseException, target: str) -> None:
    """Record an exception the contract does not allow; re-raise it unless FUZZ_KEEP_GOING=1."""
    sig = signature(e)
    key = sig.split(": ", 1)[0]
    if key not in _seen:
        _seen.add(key)
        print(f"FINDING [{target}] {sig}", file=sys.stderr, flush=True)
        if FINDINGS:
            with open(FINDINGS, "a") as f:
                f.write(f"{target}\t{sig}\n")
    if not KEEP_GOING:
        raise e


def setup_atheris(argv: list[str], test_one, *, instrument: tuple[str, ...] = ()) -> None:
    """Start atheris on test_one with Python coverage of the named modules."""
    import atheris

    atheris.Setup(argv, test_one)
    atheris.Fuzz()

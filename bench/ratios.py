"""Ratios of one benchmark group, shared by conftest.py (the table printed after a run) and report.py.

Rows are ``(impl, median_s, p99_s, rounds)``. ``rec_engine`` is the reference; ``rec_engine <mode>`` rows
(``rec_engine int8``, ...) are other modes of rec_engine, compared with the fastest baseline; every other
row is a baseline, compared with the reference."""
from __future__ import annotations

REFERENCE = "rec_engine"


def is_variant(impl: str) -> bool:
    """A rec_engine mode other than the reference ("rec_engine int8", ...): not a baseline."""
    return impl.startswith(REFERENCE + " ")


def fastest_baseline(rows):
    """(impl, median) of the fastest baseline of a group, or None."""
    base = [(r[0], r[1]) for r in rows if r[0] != REFERENCE and not is_variant(r[0])]
    return min(base, key=lambda r: r[1]) if base else None


def ratio_cell(impl, med, ref, best) -> str:
    """The ratio of one row: baseline / rec_engine, or for a variant, fastest baseline / variant."""
    if impl == REFERENCE:
        return ""
    if is_variant(impl):
        return "n/a" if best is None else f"{best[0]}/{impl} = {best[1] / med:.2f}x"
    return "n/a (no rec_engine result)" if ref is None else f"{impl}/{REFERENCE} = {med / ref[1]:.2f}x"


def label(impl: str, recall) -> str:
    """The row's name, with the recall@k a reduced-precision mode reached (the lowest over its passes)."""
    return impl if recall is None else f"{impl} (recall {recall:.4f})"

"""rec_engine.report: every metric against a plain recomputation over all the events, the A/B statistics
against their formulas (and scipy where installed), the plot and the ``report`` command."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from collections import Counter

import numpy as np
import pytest

from rec_engine.bundle import write_bundle, write_pipeline
from rec_engine.events import Event, SqliteEventStore
from rec_engine.report import (TOTAL, ab_summary, add_report_command, bundle_item_counts, feedback_metrics,
                               format_ab, format_table, plot, two_proportion_test, wilson_interval)

DAY = 86400.0
T0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc).timestamp()
ITEMS = [f"sku-{i:03d}" for i in range(60)]


def random_events(seed: int, n_requests: int = 400, versions=("v1", "v2"), days: int = 4) -> list[Event]:
    """Impressions of two versions over several days, then feedback of every awkward sort, appended in a
    shuffled order (so feedback often comes before its impression in the store)."""
    rng = np.random.default_rng(seed)
    out = []
    imps = []
    for r in range(n_requests):
        ts = T0 + rng.uniform(0, days * DAY)
        k = int(rng.integers(0, 9))                        # 0 items shown happens too
        items = tuple(ITEMS[j] for j in rng.choice(40, k, replace=False))   # items 40.. never shown
        rid = None if rng.random() < 0.05 else f"req-{r}"
        version = versions[int(rng.integers(len(versions)))]
        e = Event("impression", f"u{rng.integers(30)}", ts=ts, request_id=rid, version=version, items=items,
                  scores=tuple(rng.random(k).tolist()))
        imps.append(e)
        out.append(e)
    # a request id served twice: feedback answers the first impression in store order
    dup = next(e for e in imps if e.request_id and len(e.items) >= 2)
    out.append(Event("impression", "u-dup", ts=dup.ts + 5, request_id=dup.request_id, version=versions[-1],
                     items=(ITEMS[41], dup.items[0])))
    for e in imps:
        for item in e.items:
            late = rng.exponential(0.4 * DAY)              # some feedback lands days later
            if rng.random() < 0.25:
                rid = e.request_id if rng.random() < 0.9 else None
                n = 1 + int(rng.random() < 0.3)            # duplicate clicks
                out += [Event("click", e.user, item, ts=e.ts + late + j, request_id=rid) for j in range(n)]
                if rng.random() < 0.4:
                    value = None if rng.random() < 0.2 else float(np.round(rng.uniform(1, 50), 2))
                    n = 1 + int(rng.random() < 0.2)        # repeat purchases
                    out += [Event("conversion", e.user, item, ts=e.ts + late + 60 + j, request_id=rid, value=value)
                            for j in range(n)]
            elif rng.random() < 0.03:                      # a conversion without a recorded click
                out.append(Event("conversion", e.user, item, ts=e.ts + late, request_id=e.request_id, value=3.0))
        if e.request_id and rng.random() < 0.1:            # a click on an item the impression did not show
            out.append(Event("click", e.user, ITEMS[int(rng.integers(40, 60))], ts=e.ts + 30, request_id=e.request_id))
    for j in range(40):                                    # request ids no impression has
        out.append(Event("click", "u0", ITEMS[j % 40], ts=T0 + j * 3000.0, request_id=f"nope-{j}"))
        out.append(Event("conversion", "u0", ITEMS[j % 40], ts=T0 + j * 3000.0, request_id=f"nope-{j}", value=1.0))
    for j in range(200):                                   # ratings: popularity only
        out.append(Event("rating", f"u{j % 30}", ITEMS[int(rng.integers(0, 60))], ts=T0 + rng.uniform(0, days * DAY),
                         value=float(rng.integers(1, 6))))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "events.db"
    with SqliteEventStore(path) as st:
        st.append(random_events(1))
    return path


def day_of(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).date().isoformat()


def brute_force(events, *, n_items=None, popularity=None, since=None, until=None, grace=DAY):
    """The definitions of rec_engine.report, computed the plain way from a list of all events (store order)."""
    def in_window(e):
        return (since is None or e.ts >= since) and (until is None or e.ts < until)

    def in_read(e):
        return (since is None or e.ts >= since) and (until is None or e.ts < until + grace)

    imps = [e for e in events if e.kind == "impression" and in_window(e)]
    first = {}
    for e in imps:
        if e.request_id is not None and e.request_id not in first:
            first[e.request_id] = e
    versions = sorted({e.version for e in imps}, key=lambda v: min(e.ts for e in imps if e.version == v))
    groups = {}
    for e in imps:
        g = groups.setdefault((e.version, day_of(e.ts)), {"imps": [], "clicked": set(), "converted": set(),
                                                          "value": 0.0})
        g["imps"].append(e)
    lost = Counter()
    for e in events:
        if e.kind not in ("click", "conversion") or not in_read(e):
            continue
        imp = first.get(e.request_id) if e.request_id is not None else None
        if imp is None:
            if in_window(e):
                lost[f"{e.kind}s_{'without' if e.request_id is None else 'unknown'}_request"] += 1
            continue
        if e.item not in imp.items:
            lost[f"{e.kind}s_not_shown"] += 1
            continue
        g = groups[(imp.version, day_of(imp.ts))]
        if e.kind == "click":
            g["clicked"].add((e.request_id, e.item))
        else:
            g["converted"].add((e.request_id, e.item))
            g["value"] += e.value or 0.0
    interactions = Counter(e.item for e in events if e.kind != "impression" and in_window(e))
    shown_everywhere = {i for e in imps for i in e.items}
    if n_items is None:
        n_items = len(shown_everywhere | set(interactions) | set(popularity or ()))
    counts = interactions if popularity is None else popularity
    total = sum(counts.values())

    def row(version, day, parts):
        shown = [i for g in parts for e in g["imps"] for i in e.items]
        clicks = sum(len(g["clicked"]) for g in parts)
        conversions = sum(len(g["converted"]) for g in parts)
        nov = [-math.log2((counts.get(i, 0) + 1) / (total + n_items)) for i in shown]
        return {"version": version, "day": day, "impressions": sum(len(g["imps"]) for g in parts),
                "items_shown": len(shown), "distinct_items": len(set(shown)), "clicks": clicks,
                "ctr": clicks / len(shown) if shown else None, "conversions": conversions,
                "cvr": conversions / clicks if clicks else None, "conversion_value": sum(g["value"] for g in parts),
                "coverage": len(set(shown)) / n_items, "novelty": sum(nov) / len(nov) if nov else None,
                "n_items": n_items}

    rows = []
    for v in versions:
        days = sorted(d for (vv, d) in groups if vv == v)
        rows += [row(v, d, [groups[(v, d)]]) for d in days]
        rows.append(row(v, TOTAL, [groups[(v, d)] for d in days]))
    return rows, dict(lost)


def assert_rows_equal(got, want):
    assert [(r["version"], r["day"]) for r in got] == [(r["version"], r["day"]) for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k, v in w.items():
            if isinstance(v, float):
                assert g[k] == pytest.approx(v, rel=1e-12, abs=1e-9), (g["version"], g["day"], k)
            else:
                assert g[k] == v, (g["version"], g["day"], k)


def all_events(path):
    with SqliteEventStore(path) as st:
        return list(st.read())


def test_every_metric_matches_a_plain_recomputation(store_path):
    events = all_events(store_path)
    got = feedback_metrics(store_path)
    want, lost = brute_force(events)
    assert_rows_equal(got, want)
    assert got.unattributed == dict(sorted(lost.items()))
    assert got.n_items_from == "events" and got.n_items == want[0]["n_items"]
    # the data exercise what they are meant to: several days, each kind of unattributed feedback
    assert len({r["day"] for r in got}) >= 5
    assert {"clicks_without_request", "clicks_unknown_request", "clicks_not_shown",
            "conversions_unknown_request"} <= set(lost)
    assert all(r["cvr"] is None or r["cvr"] >= 0 for r in got)


def test_window_given_catalogue_and_popularity(store_path):
    events = all_events(store_path)
    since, until = T0 + 0.5 * DAY, T0 + 2.5 * DAY
    pop = {item: int(c) for item, c in zip(ITEMS, np.random.default_rng(3).integers(0, 100, len(ITEMS)))}
    got = feedback_metrics(store_path, n_items=500, item_popularity=pop, since=since, until=until)
    want, lost = brute_force(events, n_items=500, popularity=pop, since=since, until=until)
    assert_rows_equal(got, want)
    assert got.unattributed == dict(sorted(lost.items()))
    assert got.n_items == 500 and got.n_items_from == "given"
    # the same window as dates / ISO strings; a narrower grace for late feedback
    got = feedback_metrics(store_path, since=dt.datetime(2024, 3, 1, 12), until="2024-03-03T12:00:00",
                           attribution_s=3600)
    assert_rows_equal(got, brute_force(events, since=since, until=until, grace=3600)[0])


def test_popularity_as_an_array_by_dense_id(tmp_path):
    rng = np.random.default_rng(7)
    events = [Event("impression", "u", ts=T0 + j * 5000.0, request_id=f"r{j}", version="a",
                    items=tuple(int(i) for i in rng.choice(30, 5, replace=False))) for j in range(50)]
    events += [Event("click", "u", e.items[0], ts=e.ts + 1, request_id=e.request_id) for e in events[::3]]
    with SqliteEventStore(tmp_path / "e.db") as st:
        st.append(events)
        counts = rng.integers(0, 50, 40)
        got = feedback_metrics(st, item_popularity=counts)
        stored = list(st.read())
    want, _ = brute_force(stored, popularity={i: int(c) for i, c in enumerate(counts)})
    assert_rows_equal(got, want)
    assert got.n_items == 40                                   # the popularity's items (all shown ones among them)


def test_impressions_without_a_version_and_an_empty_store(tmp_path):
    with SqliteEventStore(tmp_path / "e.db") as st:
        assert feedback_metrics(st) == [] and ab_summary(st) == []
        st.append([Event("impression", "u", ts=T0, request_id="r", items=("x", "y")),
                   Event("click", "u", "y", ts=T0 + 1, request_id="r")])
        rows = feedback_metrics(st)
    assert [(r["version"], r["day"]) for r in rows] == [(None, "2024-03-01"), (None, TOTAL)]
    assert rows[0]["ctr"] == 0.5 and rows[0]["coverage"] == 1.0
    assert "| - | 2024-03-01 |" in format_table(rows)


def test_bad_arguments(store_path, tmp_path):
    with pytest.raises(FileNotFoundError):
        feedback_metrics(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()             # no empty store left behind
    with pytest.raises(ValueError, match="since"):
        feedback_metrics(store_path, since="yesterday")
    with pytest.raises(ValueError, match="after"):
        feedback_metrics(store_path, since=T0 + DAY, until=T0)
    with pytest.raises(ValueError, match="n_items"):
        feedback_metrics(store_path, n_items=0)
    with pytest.raises(ValueError, match="control"):
        ab_summary(feedback_metrics(store_path), control="v9")


# ---------------------------------------------------------------------------------------------- A/B
def wilson_direct(x, n, z=1.959963984540054):
    p = x / n
    centre = (2 * x + z * z) / (2 * (n + z * z))
    half = z / (n + z * z) * math.sqrt(n * p * (1 - p) + z * z / 4)
    return centre - half, centre + half


@pytest.mark.parametrize("x,n", [(0, 1), (1, 1), (3, 10), (0, 500), (500, 500), (37, 1234), (5000, 123456)])
def test_wilson_interval_matches_the_formula(x, n):
    assert wilson_interval(x, n) == pytest.approx(wilson_direct(x, n), abs=1e-12)
    lo, hi = wilson_interval(x, n)
    assert 0 <= lo <= x / n <= hi <= 1
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_wilson_interval_and_z_test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for x, n in [(0, 7), (3, 10), (37, 1234), (999, 1000)]:
        ci = stats.binomtest(x, n).proportion_ci(confidence_level=0.9, method="wilson")
        assert wilson_interval(x, n, 0.9) == pytest.approx((ci.low, ci.high), abs=1e-12)
    for x1, n1, x2, n2 in [(30, 1000, 45, 1000), (5, 80, 2, 120), (300, 4000, 310, 4100)]:
        z, p = two_proportion_test(x1, n1, x2, n2)
        chi2, p_chi2, _, _ = stats.chi2_contingency([[x1, n1 - x1], [x2, n2 - x2]], correction=False)
        assert z * z == pytest.approx(chi2, rel=1e-10)
        assert p == pytest.approx(p_chi2, rel=1e-10)
        assert p == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-10)


def test_ab_summary_per_version(store_path):
    rows = feedback_metrics(store_path)
    totals = {r["version"]: r for r in rows if r["day"] == TOTAL}
    for control in (None, "v2"):
        summary = ab_summary(rows, control=control)
        ctl = control or rows[0]["version"]
        assert [s["version"] for s in summary] == list(totals)
        for s in summary:
            t, c = totals[s["version"]], totals[ctl]
            assert (s["items_shown"], s["clicks"], s["ctr"]) == (t["items_shown"], t["clicks"], t["ctr"])
            assert (s["ctr_low"], s["ctr_high"]) == pytest.approx(wilson_direct(t["clicks"], t["items_shown"]))
            assert s["control"] == (s["version"] == ctl)
            if s["control"]:
                assert s["ctr_diff"] is None and s["p_value"] is None
            else:
                p1, p2 = c["clicks"] / c["items_shown"], t["clicks"] / t["items_shown"]
                pool = (c["clicks"] + t["clicks"]) / (c["items_shown"] + t["items_shown"])
                z = (p2 - p1) / math.sqrt(pool * (1 - pool) * (1 / c["items_shown"] + 1 / t["items_shown"]))
                assert s["ctr_diff"] == pytest.approx(p2 - p1)
                assert s["z"] == pytest.approx(z)
                assert s["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    # from the store directly, and from day rows only (summed)
    assert ab_summary(store_path) == ab_summary(rows)
    from_days = ab_summary([r for r in rows if r["day"] != TOTAL])
    assert [sorted(s.items(), key=str) for s in from_days] == [sorted(s.items(), key=str) for s in ab_summary(rows)]
    table = format_ab(ab_summary(rows))
    assert f"| {rows[0]['version']} (control) |" in table and table.count("\n") == 3


# ---------------------------------------------------------------------------------------------- output
def test_table_has_a_line_per_row(store_path):
    rows = feedback_metrics(store_path)
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == len(rows) + 2 and all(line.startswith("|") and line.endswith("|") for line in lines)
    assert lines[2].startswith(f"| {rows[0]['version']} | {rows[0]['day']} | {rows[0]['impressions']} |")


def test_plot_writes_a_png(store_path, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "feedback_per_day.png"
    assert plot(feedback_metrics(store_path), out) == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def run_cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="rec-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_command(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


def test_report_command_prints_tables_and_writes_png_and_json(store_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "ctr_per_day.png", tmp_path / "report.json"
    assert run_cli(["report", "--events", str(store_path), "--png", str(png), "--json", str(js),
                    "--since", "2024-03-02", "--until", "2024-03-03", "--control", "v2"]) == 0
    out = capsys.readouterr().out
    rows = feedback_metrics(store_path, since=T0 + DAY, until=T0 + 3 * DAY)   # --until's day is included
    assert format_table(rows) in out and format_ab(ab_summary(rows, control="v2")) in out
    assert "not attributed to an impression" in out and "v2 (control)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    got = json.loads(js.read_text())
    assert got["rows"] == json.loads(json.dumps(list(rows))) and got["n_items"] == rows.n_items
    assert [s["version"] for s in got["ab"]] == [r["version"] for r in rows if r["day"] == TOTAL]
    assert [s["control"] for s in got["ab"]] == [s["version"] == "v2" for s in got["ab"]]
    assert {r["day"] for r in got["rows"]} == {"2024-03-02", "2024-03-03", TOTAL}


def test_report_command_on_an_empty_window(store_path, capsys):
    assert run_cli(["report", "--events", str(store_path), "--since", "2030-01-01"]) == 0
    assert "no impressions" in capsys.readouterr().out


@pytest.fixture
def retrieval_bundle(tmp_path):
    rng = np.random.default_rng(5)
    n = 80
    keys = ITEMS + [f"sku-{i:03d}" for i in range(60, n)]
    counts = rng.integers(0, 40, n)
    path = write_bundle(tmp_path / "pop", kind="popularity", meta={"n_users": 3, "n_items": n},
                        arrays={"item_counts": counts}, keys={"item": keys})
    return path, dict(zip(keys, counts.tolist()))


def test_bundle_gives_catalogue_and_popularity(store_path, retrieval_bundle, tmp_path, capsys):
    path, counts = retrieval_bundle
    n, pop = bundle_item_counts(path)
    assert n == 80 and len(pop) == 80 and pop["sku-007"] == counts["sku-007"] and "nope" not in pop
    assert pop.get(12) is None and dict(pop) == counts
    want, _ = brute_force(all_events(store_path), n_items=80, popularity=counts)
    assert_rows_equal(feedback_metrics(store_path, n_items=n, item_popularity=pop), want)
    pipeline = write_pipeline(tmp_path / "pipe", retrieval=path)
    assert bundle_item_counts(pipeline)[0] == 80
    assert run_cli(["report", "--events", str(store_path), "--bundle", str(pipeline)]) == 0
    out = capsys.readouterr().out
    assert format_table(want) in out and "coverage over 80 items (the bundle" in out

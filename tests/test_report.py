"""Tests for vitprune.measure.report: table, CSV/JSON round trip, Pareto front and plot."""
from __future__ import annotations

import csv
import json
import math
import re

import pytest
from rich.console import Console

from vitprune.measure.report import (
    BenchRow,
    compact_tokens,
    pareto_front,
    pareto_plot,
    print_table,
    read_csv,
    read_json,
    write_csv,
    write_json,
)

MODEL = "deit_tiny_patch16_224"


def _rows(*, speed: bool = True, acc: bool = True) -> list[BenchRow]:
    def r(method, config, gmacs, spd, top1, tokens, extra=None):
        return BenchRow(
            model=MODEL,
            method=method,
            config=config,
            gmacs=gmacs,
            macs_ratio=1.2579 / gmacs,
            img_per_s=(1000.04 * spd) if speed else None,
            speedup=spd if speed else None,
            top1=top1 if acc else None,
            top1_delta=(top1 - 0.7214) if acc else None,
            tokens_per_layer=tokens,
            extra=extra or {},
        )

    return [
        # deliberately not first: the table must still show the unpatched row first
        r("tome", "r=8", 0.9312, 1.3456, 0.7202, [197.0 - 8 * i for i in range(12)], {"batch": 64}),
        r("none", "", 1.2579, 1.0, 0.7214, [197.0] * 12),
        r("tome", "r=13", 0.7401, 1.6049, 0.7054, [197.0 - 13 * i for i in range(12)], {"fuse": True}),
        r("evit", "keep=0.7@3,6,9", 0.8811, 1.4123, 0.7188,
          [65.0] * 3 + [49.0] * 3 + [33.0] * 3 + [17.0] * 3, {"note": "a,b \"q\""}),
    ]


# ---------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------
def _render(rows, **kw) -> str:
    console = Console(record=True, width=220, force_terminal=False, color_system=None)
    print_table(rows, console=console, **kw)
    return console.export_text()


def test_table_numbers_formatted():
    text = _render(_rows(), title="bench title")
    assert "bench title" in text
    for header in ("model", "method", "config", "GMACs", "MACs ratio", "img/s", "speedup",
                   "top-1 (%)", "Δtop-1 (pt)", "tokens per layer"):
        assert header in text
    assert "1.26" in text and "0.93" in text  # GMACs, 2 decimals
    assert "1.35×" in text and "1.70×" in text  # MACs ratio 1.2579/0.9312, 1.2579/0.7401
    assert "1000.0" in text and "1345.7" in text  # img/s, 1 decimal
    assert "1.00×" in text and "1.60×" in text  # speedup
    assert "72.14" in text and "70.54" in text  # top-1 in %
    assert "+0.00" in text and "-0.12" in text and "-1.60" in text  # signed Δ in pt
    assert "-0.00" not in text
    # compact token schedules
    assert "65→65→65→49→…" in text
    assert "197→…→197" in text  # constant schedule


def test_table_order_baseline_first_and_models_grouped():
    rows = _rows()
    other = BenchRow("vit_small_patch16_224", "tome", "r=8", 3.0, 1.5)
    other_base = BenchRow("vit_small_patch16_224", "none", "", 4.6, 1.0)
    text = _render([rows[0], other, rows[1], other_base, *rows[2:]])
    lines = [ln for ln in text.splitlines() if MODEL in ln or "vit_small" in ln]
    first = [ln.split("│")[2].strip() for ln in lines]  # method column
    models = [ln.split("│")[1].strip() for ln in lines]
    assert models == [MODEL] * 4 + ["vit_small_patch16_224"] * 2
    assert first == ["none", "tome", "tome", "evit", "none", "tome"]


def test_table_missing_values_dash():
    text = _render(_rows(speed=False, acc=False))
    row = next(ln for ln in text.splitlines() if "r=13" in ln)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    # model, method, config, GMACs, ratio, img/s, speedup, top1, dtop1, tokens
    assert cells[3] == "0.74" and cells[4] == "1.70×"
    assert cells[5:9] == ["–"] * 4
    empty = BenchRow(MODEL, "x", "c", 1.0, 1.0)
    assert _render([empty]).count("–") >= 5  # tokens too


def test_table_colours():
    rows = [
        BenchRow(MODEL, "a", "good", 1.0, 1.0, speedup=1.5, top1=0.8, top1_delta=0.001),
        BenchRow(MODEL, "b", "bad", 1.0, 1.0, speedup=0.9, top1=0.7, top1_delta=-0.05),
        BenchRow(MODEL, "c", "meh", 1.0, 1.0, speedup=0.95, top1=0.75, top1_delta=-0.005),
    ]
    console = Console(record=True, width=220, force_terminal=True, color_system="standard")
    print_table(rows, console=console)
    ansi = console.export_text(styles=True)

    def styled(code: str, value: str) -> bool:  # rich puts the cell padding inside the style span
        return re.search(re.escape(f"\x1b[{code}m") + r" *" + re.escape(value), ansi) is not None

    green, red = "32", "31"
    assert styled(green, "+0.10")
    assert styled(green, "1.50×")
    assert styled(red, "-5.00")
    assert not styled(green, "0.90×") and not styled(red, "0.90×")
    assert not styled(green, "-0.50") and not styled(red, "-0.50")
    assert "-0.50" in ansi and "0.95×" in ansi


def test_print_table_default_console(capsys):
    print_table(_rows())
    assert "72.14" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# compact tokens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tokens, expected",
    [
        ([], "–"),
        ([197.0], "197"),
        ([197, 150, 100], "197→150→100"),
        ([65] * 3 + [49] * 3 + [33] * 3 + [17] * 3, "65→65→65→49→…→33→…→17"),
        ([65] * 3 + [49] * 9, "65→65→65→49→…→49"),
        ([197] * 12, "197→…→197"),
        ([197 - 8 * i for i in range(12)], "197→189→181→173→165→…→109"),
        ([197] * 8 + [99] * 4, "197→…→197→99→…→99"),
        ([197.0, 197.0, 197.0, 150.44, 120.0, 120.0, 120.0], "197→197→197→150.4→120→…→120"),
    ],
)
def test_compact_tokens(tokens, expected):
    assert compact_tokens(tokens) == expected


# ---------------------------------------------------------------------------------------------
# CSV / JSON
# ---------------------------------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    rows = _rows()
    rows[0].extra["nested"] = {"a": [1, 2.5]}
    meta = {"device": "cpu", "batch": 64, "torch": "2.5", "path": tmp_path}
    p = write_json(rows, tmp_path / "sub" / "bench.json", meta=meta)
    back, meta_back = read_json(p)
    assert back == rows
    assert meta_back == {**meta, "path": str(tmp_path)}
    doc = json.loads(p.read_text())
    assert set(doc) == {"meta", "rows"}
    assert isinstance(doc["rows"][0]["gmacs"], float)
    assert isinstance(doc["rows"][1]["speedup"], float)  # 1.0 stays a float
    assert doc["rows"][0]["tokens_per_layer"][0] == 197.0


def test_json_round_trip_missing_and_no_meta(tmp_path):
    rows = _rows(speed=False, acc=False)
    p = write_json(rows, tmp_path / "b.json")
    back, meta = read_json(p)
    assert back == rows and meta == {}
    assert all(r.top1 is None and r.speedup is None for r in back)


def test_csv_layout_and_round_trip(tmp_path):
    rows = _rows()
    rows[1].speedup = None  # one missing value
    p = write_csv(rows, tmp_path / "bench.csv")
    with p.open(newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == len(rows)
    header = list(lines[0].keys())
    assert header[:10] == ["model", "method", "config", "gmacs", "macs_ratio", "img_per_s", "speedup",
                           "top1", "top1_delta", "tokens_per_layer"]
    assert header[10:] == ["extra.batch", "extra.fuse", "extra.note"]  # union, first-appearance order
    assert lines[0]["tokens_per_layer"].split()[:3] == ["197", "189", "181"]
    assert lines[0]["extra.batch"] == "64" and lines[0]["extra.fuse"] == ""
    assert lines[1]["speedup"] == ""
    assert lines[3]["extra.note"] == 'a,b "q"'
    back = read_csv(p)
    assert back == rows
    assert math.isclose(float(lines[0]["gmacs"]), 0.9312)


# ---------------------------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------------------------
def test_pareto_front_basic():
    pts = [(1.0, 0.5), (2.0, 0.7), (1.5, 0.4), (3.0, 0.9), (2.5, 0.6)]
    # (1.5,0.4) dominated by (1,0.5); (2.5,0.6) dominated by (2,0.7)
    assert pareto_front(pts) == [0, 1, 3]


def test_pareto_front_single_and_empty():
    assert pareto_front([(4.6, 79.9)]) == [0]
    assert pareto_front([]) == []


def test_pareto_front_ties():
    # identical points: neither dominates the other -> both kept
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]
    # same x, lower y is dominated; same y, higher x is dominated
    assert pareto_front([(1.0, 1.0), (1.0, 0.9)]) == [0]
    assert pareto_front([(2.0, 1.0), (1.0, 1.0)]) == [1]
    # all on a strict trade-off curve
    assert pareto_front([(3, 3), (1, 1), (2, 2)]) == [0, 1, 2]


def test_pareto_front_nan_excluded():
    assert pareto_front([(1.0, float("nan")), (2.0, 0.5)]) == [1]


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------
def _check_png(path):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert w > 800 and h > 300 and w > h  # two panels side by side


@pytest.mark.parametrize("speed, acc", [(True, True), (False, True), (True, False), (False, False)])
def test_pareto_plot_png(tmp_path, speed, acc):
    out = pareto_plot(_rows(speed=speed, acc=acc), tmp_path / "pareto.png", title="t")
    assert out == [tmp_path / "pareto.png"]
    _check_png(out[0])


def test_pareto_plot_several_models(tmp_path):
    rows = _rows() + [
        BenchRow("vit_small_patch16_224.augreg_in21k", "none", "", 4.6, 1.0),
        BenchRow("vit_small_patch16_224.augreg_in21k", "tome", "r=8", 3.0, 1.53, top1=0.8),
    ]
    out = pareto_plot(rows, tmp_path / "p.png")
    assert [p.name for p in out] == [f"p_{MODEL}.png", "p_vit_small_patch16_224.augreg_in21k.png"]
    for p in out:
        _check_png(p)


def test_pareto_plot_no_rows(tmp_path):
    with pytest.raises(ValueError):
        pareto_plot([], tmp_path / "x.png")

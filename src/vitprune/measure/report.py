"""Bench results: one row per (model, method, config), printed as a rich table, saved as CSV/JSON, plotted."""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

__all__ = [
    "BenchRow",
    "compact_tokens",
    "pareto_front",
    "pareto_plot",
    "print_table",
    "read_csv",
    "read_json",
    "write_csv",
    "write_json",
]

MISSING = "–"  # shown for values that were not measured


@dataclass
class BenchRow:
    """One measured configuration. ``None`` means "not measured in this run"."""

    model: str
    method: str  # "none" for the unpatched model
    config: str  # human-readable config, e.g. "r=13" or "keep=0.7@3,6,9"
    gmacs: float  # GMACs (multiply-accumulates, as papers' "FLOPs") per image, from executed ops
    macs_ratio: float  # unpatched GMACs / this GMACs (>1 means cheaper)
    img_per_s: float | None = None
    speedup: float | None = None  # img/s relative to the unpatched model measured in the same run
    top1: float | None = None  # in [0, 1]
    top1_delta: float | None = None  # top1 - unpatched top1, in [−1, 1]
    tokens_per_layer: list[float] = field(default_factory=list)  # mean tokens entering each block
    extra: dict[str, Any] = field(default_factory=dict)

    # -- helpers (not fields) -------------------------------------------------------------------
    @property
    def is_baseline(self) -> bool:
        """True for the unpatched model (``method == "none"``)."""
        return self.method == "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (``tokens_per_layer`` and ``extra`` copied)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchRow":
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing optional ones get defaults."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["tokens_per_layer"] = list(kw.get("tokens_per_layer") or [])
        kw["extra"] = dict(kw.get("extra") or {})
        return cls(**kw)


_BASE_COLUMNS = [f.name for f in fields(BenchRow) if f.name != "extra"]


# ----------------------------------------------------------------------------------------------
# formatting helpers
# ----------------------------------------------------------------------------------------------
def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return MISSING if _is_missing(x) else f"{x:{spec}}{suffix}"


def _fmt_delta_pt(delta: float | None) -> tuple[str, str | None]:
    """Δtop-1 (fraction) -> ("+0.12", style) in percentage points; no "-0.00"."""
    if _is_missing(delta):
        return MISSING, None
    pt = round(delta * 100.0, 2)
    if pt == 0:
        pt = 0.0  # normalise -0.0
    style = "green" if pt >= 0 else ("red" if pt < -1.0 else None)
    return f"{pt:+.2f}", style


def _fmt_tok(x: float) -> str:
    x = float(x)
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def compact_tokens(tokens: Iterable[float], max_items: int = 6) -> str:
    """Compact token schedule, e.g. ``65→65→65→49→…→33→…→17``.

    Short schedules (≤ ``max_items`` layers) are shown in full. Otherwise: the layers up to and
    including the first change (so you can count where reduction starts; a long unchanged prefix
    is itself elided), then each layer where the count changes, then the last layer; ``…`` marks
    omitted layers (which have the same count as the value before them, unless the list was
    capped at ``max_items`` values, in which case ``…`` precedes the last layer).
    Fractional means are shown with one decimal.
    """
    vals = [_fmt_tok(t) for t in tokens]
    n = len(vals)
    if n == 0:
        return MISSING
    if n <= max_items:
        return "→".join(vals)
    changes = [i for i in range(1, n) if vals[i] != vals[i - 1]]
    if changes:
        c = changes[0]
        head = list(range(c + 1)) if c <= 3 else [0, c - 1, c]
        keep = sorted(set(head) | set(changes) | {n - 1})
    else:
        keep = [0, n - 1]
    if len(keep) > max_items:
        keep = keep[: max_items - 1] + [n - 1]
    out: list[str] = []
    prev = None
    for i in keep:
        if prev is not None and i != prev + 1:
            out.append("…")
        out.append(vals[i])
        prev = i
    return "→".join(out)


def _ordered(rows: list[BenchRow]) -> list[BenchRow]:
    """Rows grouped by model (first-appearance order), unpatched rows first, otherwise as given."""
    model_idx: dict[str, int] = {}
    for r in rows:
        model_idx.setdefault(r.model, len(model_idx))
    keyed = sorted(enumerate(rows), key=lambda ir: (model_idx[ir[1].model], not ir[1].is_baseline, ir[0]))
    return [r for _, r in keyed]


# ----------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------
def print_table(rows: list[BenchRow], *, title: str | None = None, console: "Console | None" = None,
                latency: bool | None = None) -> None:
    """Print ``rows`` as a rich table (unpatched rows first within each model; models separated).

    ``latency``: p50 and p90 latency per call (ms) instead of img/s, for batch-1 timings (default: when every timed
    row has ``extra["latency_p90_ms"]``). A peak-memory column appears when some row has ``extra["peak_mib"]``.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(width=None if Console().is_terminal else 160)  # logs and CI get full tables
    timed = [r for r in rows if not _is_missing(r.img_per_s)]
    if latency is None:
        latency = bool(timed) and all("latency_p90_ms" in r.extra for r in timed)
    memory = any(not _is_missing(r.extra.get("peak_mib")) for r in rows)
    table = Table(title=title, header_style="bold")
    table.add_column("model", overflow="fold")
    table.add_column("method")
    table.add_column("config", overflow="fold")
    table.add_column("GMACs", justify="right")
    table.add_column("MACs ratio", justify="right")
    if latency:
        table.add_column("p50 ms", justify="right")
        table.add_column("p90 ms", justify="right")
    else:
        table.add_column("img/s", justify="right")
    table.add_column("speedup", justify="right")
    if memory:
        table.add_column("peak MiB", justify="right")
    table.add_column("top-1 (%)", justify="right")
    table.add_column("Δtop-1 (pt)", justify="right")
    table.add_column("tokens per layer", overflow="fold")

    prev_model = None
    for r in _ordered(rows):
        if prev_model is not None and r.model != prev_model:
            table.add_section()
        prev_model = r.model
        spd = _fmt(r.speedup, ".2f", "×")
        spd_style = "green" if not _is_missing(r.speedup) and r.speedup >= 1.0 else None
        dtxt, dstyle = _fmt_delta_pt(r.top1_delta)
        speed = ([_fmt(r.extra.get("latency_p50_ms"), ".2f"), _fmt(r.extra.get("latency_p90_ms"), ".2f")]
                 if latency else [_fmt(r.img_per_s, ".1f")])
        table.add_row(
            r.model,
            r.method,
            r.config,
            _fmt(r.gmacs, ".2f"),
            _fmt(r.macs_ratio, ".2f", "×"),
            *speed,
            Text(spd, style=spd_style or ""),
            *([_fmt(r.extra.get("peak_mib"), ".0f")] if memory else []),
            _fmt(None if _is_missing(r.top1) else r.top1 * 100.0, ".2f"),
            Text(dtxt, style=dstyle or ""),
            compact_tokens(r.tokens_per_layer),
            style="bold" if r.is_baseline else None,
        )
    console.print(table)


# ----------------------------------------------------------------------------------------------
# CSV / JSON
# ----------------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    item = getattr(o, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return item()
        except Exception:  # noqa: BLE001 - arrays with >1 element etc.
            pass
    tolist = getattr(o, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(o)


def _csv_num(x: Any) -> str:
    if _is_missing(x):
        return ""
    if isinstance(x, float) and x.is_integer():
        return str(int(x)) if abs(x) < 2**53 else repr(x)
    return repr(x) if isinstance(x, float) else str(x)


def write_csv(rows: list[BenchRow], path: str | Path) -> Path:
    """One CSV line per row, in the given order.

    ``tokens_per_layer`` is a space-separated string; ``extra`` is flattened to ``extra.<key>``
    columns (union over rows, first-appearance order); non-string extra values are JSON-encoded.
    Missing values are empty cells.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra_keys: list[str] = []
    for r in rows:
        for k in r.extra:
            if k not in extra_keys:
                extra_keys.append(k)
    header = _BASE_COLUMNS + [f"extra.{k}" for k in extra_keys]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            line = []
            for name in _BASE_COLUMNS:
                v = getattr(r, name)
                if name == "tokens_per_layer":
                    line.append(" ".join(_csv_num(float(t)) for t in v))
                elif isinstance(v, str):
                    line.append(v)
                else:
                    line.append(_csv_num(v))
            for k in extra_keys:
                if k not in r.extra or r.extra[k] is None:
                    line.append("")
                else:
                    v = r.extra[k]
                    line.append(v if isinstance(v, str) else json.dumps(v, default=_json_default))
            w.writerow(line)
    return path


def read_csv(path: str | Path) -> list[BenchRow]:
    """Best-effort inverse of :func:`write_csv` (extra cells are JSON-decoded when possible)."""
    out: list[BenchRow] = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for d in csv.DictReader(fh):
            kw: dict[str, Any] = {"model": d["model"], "method": d["method"], "config": d["config"]}
            for name in ("gmacs", "macs_ratio", "img_per_s", "speedup", "top1", "top1_delta"):
                cell = d.get(name, "")
                kw[name] = float(cell) if cell not in ("", None) else None
            kw["tokens_per_layer"] = [float(t) for t in (d.get("tokens_per_layer") or "").split()]
            extra: dict[str, Any] = {}
            for k, cell in d.items():
                if k.startswith("extra.") and cell not in ("", None):
                    try:
                        extra[k[len("extra."):]] = json.loads(cell)
                    except ValueError:
                        extra[k[len("extra."):]] = cell
            kw["extra"] = extra
            out.append(BenchRow(**kw))
    return out


def write_json(rows: list[BenchRow], path: str | Path, meta: dict | None = None) -> Path:
    """Write ``{"meta": meta, "rows": [row dicts]}`` (rows in the given order, floats as floats)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": dict(meta or {}), "rows": [r.to_dict() for r in rows]}
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8")
    return path


def read_json(path: str | Path) -> tuple[list[BenchRow], dict]:
    """Read a document written by :func:`write_json`: ``(rows, meta)``."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return [BenchRow.from_dict(d) for d in doc.get("rows", [])], dict(doc.get("meta") or {})


# ----------------------------------------------------------------------------------------------
# Pareto
# ----------------------------------------------------------------------------------------------
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of points not dominated by any other point.

    Lower x is better, higher y is better: ``j`` dominates ``i`` when ``x_j <= x_i`` and
    ``y_j >= y_i`` with at least one strict. Identical points do not dominate each other, so
    all copies of a frontier point are kept. Points with a NaN coordinate are never on the front.
    """
    pts = [(float(x), float(y)) for x, y in points]
    ok = [not (math.isnan(x) or math.isnan(y)) for x, y in pts]
    front = []
    for i, (xi, yi) in enumerate(pts):
        if not ok[i]:
            continue
        dominated = any(
            ok[j] and xj <= xi and yj >= yi and (xj < xi or yj > yi)
            for j, (xj, yj) in enumerate(pts)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*"]


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


def _panel(ax, rows: list[BenchRow], metric, ylabel: str, styles: dict[str, tuple[Any, str]]) -> bool:
    """Draw one panel; returns False (and writes "not measured") when nothing to plot."""
    pts = [(r, float(r.gmacs), metric(r)) for r in rows if not _is_missing(r.gmacs)]
    pts = [(r, x, y) for r, x, y in pts if not _is_missing(y)]
    ax.set_xlabel("GMACs (multiply-accumulates)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    if not pts:
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center",
                fontsize=14, color="0.45")
        ax.set_xticks([])
        ax.set_yticks([])
        return False

    # Pareto frontier over every plotted point: best metric for <= GMACs, as a step line.
    front = pareto_front([(x, y) for _, x, y in pts])
    fx_fy = sorted({(pts[i][1], pts[i][2]) for i in front})  # copies of a point collapse
    if fx_fy:
        xmax = max(x for _, x, _ in pts)
        xs = [x for x, _ in fx_fy] + [xmax]
        ys = [y for _, y in fx_fy] + [fx_fy[-1][1]]
        ax.plot(xs, ys, drawstyle="steps-post", color="0.55", linewidth=0.9, zorder=1,
                label="Pareto frontier")

    for method, (color, marker) in styles.items():
        mpts = sorted(((r, x, y) for r, x, y in pts if r.method == method), key=lambda t: (t[1], t[2]))
        if not mpts:
            continue
        if method == "none":
            for k, (r, x, y) in enumerate(mpts):
                ax.axhline(y, color="black", linestyle="--", linewidth=0.9, alpha=0.6, zorder=1)
                ax.scatter([x], [y], marker="*", s=180, color="black", zorder=4,
                           label="unpatched" if k == 0 else None)
            continue
        ax.plot([x for _, x, _ in mpts], [y for _, _, y in mpts], color=color, marker=marker,
                markersize=6, linewidth=1.3, zorder=3, label=method)
        for k, (r, x, y) in enumerate(mpts):
            ax.annotate(r.config, (x, y), xytext=(5, 5 if k % 2 == 0 else -9), textcoords="offset points",
                        fontsize=7, color=color, zorder=2,  # under markers: labels never hide points
                        bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.75))
    ax.margins(x=0.08, y=0.12)
    return True


def pareto_plot(rows: list[BenchRow], path: str | Path, *, title: str | None = None) -> list[Path]:
    """Accuracy-vs-GMACs and speedup-vs-GMACs PNG(s); one figure per model.

    With several models each file gets a ``_<model>`` suffix; returns the written paths.
    Uses the Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure
    import matplotlib

    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)

    models: list[str] = []
    methods: list[str] = []
    for r in rows:
        if r.model not in models:
            models.append(r.model)
        if r.method not in methods and r.method != "none":
            methods.append(r.method)
    if not models:
        raise ValueError("pareto_plot: no rows")
    # Same method -> same colour/marker in every model's figure.
    cmap = matplotlib.colormaps["tab10"]
    styles: dict[str, tuple[Any, str]] = {"none": ("black", "*")}
    for k, m in enumerate(methods):
        styles[m] = (to_hex(cmap(k % 10)), _MARKERS[k % len(_MARKERS)])

    written: list[Path] = []
    for model in models:
        mrows = [r for r in rows if r.model == model]
        out = path if len(models) == 1 else path.with_name(f"{path.stem}_{_safe_name(model)}{path.suffix}")
        fig = Figure(figsize=(13, 5.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax_acc, ax_spd = fig.subplots(1, 2)
        _panel(ax_acc, mrows, lambda r: None if _is_missing(r.top1) else r.top1 * 100.0,
               "top-1 accuracy (%)", styles)
        _panel(ax_spd, mrows, lambda r: r.speedup, "speedup (× vs unpatched img/s)", styles)
        ax_acc.set_title("accuracy vs cost", fontsize=10)
        ax_spd.set_title("throughput vs cost", fontsize=10)
        if title and len(models) > 1:
            fig.suptitle(f"{title} — {model}", fontsize=12)
        else:
            fig.suptitle(title or model, fontsize=12)
        # One shared legend below the panels so it never covers data.
        handles, labels = [], []
        for ax in (ax_acc, ax_spd):
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 8),
                       fontsize=9, frameon=False)
        fig.savefig(out, dpi=130)
        written.append(out)
    return written

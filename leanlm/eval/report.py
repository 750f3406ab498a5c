"""Render evaluation results as terminal/markdown tables and a self-contained HTML report.

The first result is the baseline: Δ perplexity and size ratio are relative to it.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..atomic import atomic_write_text

DASH = "–"

_HEADERS = ["name", "ppl", "Δ ppl", "bits/byte", "weights MB", "x smaller",
            "prefill tok/s", "decode tok/s", "peak RSS MB"]

# A JSON object counts as a result only if it has at least one of these keys;
# this rejects unrelated JSON files (configs, package.json, ...) with a clear error.
_RESULT_KEYS = {"name", "model", "recipe", "perplexity", "bits_per_byte", "weight_bytes",
                "parameters", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"}

_FIX = "pass a JSON file written by `leanlm eval --json`"


# ---------------------------------------------------------------- tables

def _num(value) -> float | None:
    """Return value as a float, or None when it is missing or not a number."""
    # bool is an int subclass; a stray True must not render as 1.00.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    v = _num(value)
    return DASH if v is None else f"{v / scale:{spec}}"


def _delta_pct(base, value) -> str:
    b, v = _num(base), _num(value)
    if b is None or v is None or b == 0 or not math.isfinite(b):
        return DASH
    return f"{(v - b) / b * 100:+.2f}%"


def _size_ratio(base, value) -> str:
    b, v = _num(base), _num(value)
    if b is None or v is None or v == 0:
        return DASH
    return f"{b / v:.2f}x"


def _rows(results: list[dict]) -> list[list[str]]:
    """One list of formatted cells per result, in _HEADERS order."""
    base = results[0] if results else {}
    rows = []
    for i, r in enumerate(results):
        rows.append([
            DASH if r.get("name") is None else str(r["name"]),
            _fmt(r.get("perplexity"), ".2f"),
            DASH if i == 0 else _delta_pct(base.get("perplexity"), r.get("perplexity")),
            _fmt(r.get("bits_per_byte"), ".3f"),
            _fmt(r.get("weight_bytes"), ".1f", 1e6),
            _size_ratio(base.get("weight_bytes"), r.get("weight_bytes")),
            _fmt(r.get("prefill_tokens_per_s"), ".1f"),
            _fmt(r.get("decode_tokens_per_s"), ".1f"),
            _fmt(r.get("peak_rss_bytes"), ".1f", 1e6),
        ])
    return rows


def _setup_line(results: list[dict]) -> str:
    if not results:
        return "No results."
    r = results[0]

    def get(key):
        return DASH if r.get(key) is None else str(r[key])

    return (f"Perplexity on {get('data')}: {get('eval_tokens')} tokens, window {get('window')}, "
            f"stride {get('stride')}; Δ ppl and size are relative to the first row ({get('name')}).")


def format_table(results: list[dict]) -> str:
    """Fixed-width plain-text table, one row per result; names left-aligned, numbers right."""
    rows = [_HEADERS] + _rows(results)
    widths = [max(len(row[c]) for row in rows) for c in range(len(_HEADERS))]

    def line(row):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule] + [line(row) for row in rows[1:]])


def format_markdown(results: list[dict]) -> str:
    """GitHub markdown table with the same columns, preceded by a one-line setup description."""
    def md_row(cells):
        # An unescaped '|' or newline in a name would split or end the row, and '<' could
        # start an HTML tag that GitHub strips.
        cells = [c.replace("|", r"\|").replace("<", r"\<").replace("\n", " ") for c in cells]
        return "| " + " | ".join(cells) + " |"

    align = "| :--- | " + " | ".join("---:" for _ in _HEADERS[1:]) + " |"
    lines = [_setup_line(results), "", md_row(_HEADERS), align]
    lines += [md_row(row) for row in _rows(results)]
    return "\n".join(lines)


# ---------------------------------------------------------------- SVG plots

_W, _H = 480, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 24, 16, 48


def _ticks(values: list[float], target: int = 5) -> list[float]:
    """'Nice' tick positions (steps of 1, 2, 2.5, 5 x 10^k) spanning values; always >= 2 ticks."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):
        # Equal values (or a single point) would give a zero-width axis.
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    # A margin keeps extreme points (and their labels) off the plot frame; a non-negative
    # quantity (size, speed) should not get a negative axis.
    margin = (hi - lo) * 0.05
    lo, hi = (max(lo - margin, 0.0) if lo >= 0 else lo - margin), hi + margin
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def _tick_label(value: float, step: float) -> str:
    decimals = 0
    while decimals < 12 and abs(round(step, decimals) - step) > step * 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


def _scatter(results: list[dict], x_key: str, x_scale: float, x_label: str, missing: str) -> str:
    """An inline SVG scatter of perplexity (y) against results[x_key] / x_scale (x)."""
    esc = html.escape
    caption = f"<figcaption>perplexity vs {esc(x_label)}</figcaption>"
    points, any_x = [], False
    for i, r in enumerate(results):
        x, y = _num(r.get(x_key)), _num(r.get("perplexity"))
        any_x = any_x or x is not None
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            name = DASH if r.get("name") is None else str(r["name"])
            points.append((x / x_scale, y, name, i == 0))
    if not points:
        note = missing if not any_x else "no finite perplexity to plot"
        return f'<figure>{caption}<p class="note">{esc(note)}</p></figure>'

    xt, yt = _ticks([p[0] for p in points]), _ticks([p[1] for p in points])
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP

    def sx(v):
        return x0 + (v - xt[0]) / (xt[-1] - xt[0]) * (x1 - x0)

    def sy(v):
        return y0 - (v - yt[0]) / (yt[-1] - yt[0]) * (y0 - y1)

    step_x, step_y = xt[1] - xt[0], yt[1] - yt[0]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
             f'viewBox="0 0 {_W} {_H}" role="img" aria-label="perplexity vs {esc(x_label)}">']
    for t in xt:
        px = sx(t)
        parts.append(f'<line class="grid" x1="{px:.1f}" y1="{y1}" x2="{px:.1f}" y2="{y0}"/>'
                     f'<text x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">'
                     f'{_tick_label(t, step_x)}</text>')
    for t in yt:
        py = sy(t)
        parts.append(f'<line class="grid" x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}"/>'
                     f'<text x="{x0 - 6}" y="{py + 4:.1f}" text-anchor="end">'
                     f'{_tick_label(t, step_y)}</text>')
    parts.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>'
                 f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>'
                 f'<text x="{(x0 + x1) / 2:.1f}" y="{_H - 8}" text-anchor="middle">{esc(x_label)}</text>'
                 f'<text transform="translate(14 {(y0 + y1) / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle">perplexity</text>')
    # Baseline last so it is drawn on top of any point it overlaps.
    for x, y, name, is_base in sorted(points, key=lambda p: p[3]):
        px, py = sx(x), sy(y)
        # Labels on the right half go to the left of the point so they stay inside the plot.
        right_half = px > (x0 + x1) / 2
        lx, anchor = (px - 8, "end") if right_half else (px + 8, "start")
        cls = "point baseline" if is_base else "point"
        parts.append(f'<circle class="{cls}" cx="{px:.1f}" cy="{py:.1f}" r="{6 if is_base else 4}">'
                     f'<title>{esc(name)}: {esc(x_label)} {x:g}, perplexity {y:.2f}</title></circle>'
                     f'<text class="label" x="{lx:.1f}" y="{py - 6:.1f}" '
                     f'text-anchor="{anchor}">{esc(name)}</text>')
    parts.append("</svg>")
    return f"<figure>{caption}{''.join(parts)}</figure>"


# ---------------------------------------------------------------- HTML page

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; }
th { background: #f4f4f4; }
td:not(:first-child), th:not(:first-child) { text-align: right; }
td:first-child, th:first-child { text-align: left; }
tr.baseline td { background: #fff3e0; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 2em; }
figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: 4px; }
svg text { font-size: 11px; fill: #333; }
svg .grid { stroke: #eee; }
svg .axis { stroke: #555; }
svg .point { fill: #1f77b4; }
svg .point.baseline { fill: #ff7f0e; stroke: #333; }
.note { color: #777; font-style: italic; }
"""


def render_html(results: list[dict], title: str = "leanlm report") -> str:
    """A complete self-contained HTML page: results table plus two hand-written SVG scatter plots."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _HEADERS)
    body = []
    for i, row in enumerate(_rows(results)):
        cls = ' class="baseline"' if i == 0 else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    plots = (_scatter(results, "weight_bytes", 1e6, "weights (MB)", "size not measured")
             + _scatter(results, "decode_tokens_per_s", 1.0, "decode tokens/s", "speed not measured"))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n<p>{esc(_setup_line(results))} "
        "The baseline is highlighted in orange.</p>\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body)
        + f"\n</tbody>\n</table>\n<div class=\"plots\">\n{plots}\n</div>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------- files

def write_report(results: list[dict], out_dir, title: str = "leanlm report") -> dict[str, Path]:
    """Atomically write report.json, report.md and report.html into out_dir (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Render everything before writing anything, so a rendering error leaves old reports untouched.
    # default=str: a stray non-JSON value (e.g. a Path) must not lose a long evaluation's report.
    texts = {
        "json": ("report.json", json.dumps({"title": title, "results": results},
                                           indent=2, default=str) + "\n"),
        "md": ("report.md", f"# {title}\n\n{format_markdown(results)}\n"),
        "html": ("report.html", render_html(results, title)),
    }
    return {key: atomic_write_text(out / name, text) for key, (name, text) in texts.items()}


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean",
             int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _load_one(path: Path) -> list[dict]:
    where = f"results file '{path}'"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{where} does not exist: check the path, or create it with "
                         "`leanlm eval --json`") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text: {_FIX}") from None
    except OSError as e:
        raise ValueError(f"{where} cannot be read ({e.strerror or type(e).__name__}): "
                         f"check the path and permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON (line {e.lineno}): {_FIX}") from None

    items = data["results"] if isinstance(data, dict) and "results" in data else data
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        problem = f"it holds a JSON {_json_type(items)}"
    else:
        problem = None
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                problem = f"entry {i} is a JSON {_json_type(item)}"
            elif not _RESULT_KEYS & item.keys():
                problem = f"entry {i} has none of the result fields (name, perplexity, ...)"
            if problem:
                break
    if problem:
        raise ValueError(f"{where} does not hold evaluation results ({problem}; expected a result "
                         f"object, a list of them, or a report.json): {_FIX}")
    return items


def load_results(paths: list[str | Path]) -> list[dict]:
    """Read result JSON files (a result, a list of results, or a report.json) and concatenate them.

    Raises ValueError with a one-line message naming the file for a missing file, invalid JSON
    or JSON of the wrong shape.
    """
    results: list[dict] = []
    for path in paths:
        results.extend(_load_one(Path(path)))
    return results

"""The eval report: summaries per task and column, the merge view, a printed table, report.html and PNG grids.

Files in the output folder (all figures can be recomputed from the images):

    report.json                       per task: columns, per-metric {"mean", "ci95", "n"}, per-row values, merge view
    report.html                       per task: metric table, merge view, image grid (input | target | columns)
    grids/<task>.png                  the same image grid as one PNG, with column labels
    images/<task>/<column>/<row>.png  every image the figures were computed from (input and target included)

The HTML refers to the images by relative path, so the folder can be moved or zipped as a whole. A small inline
script marks any image that fails to load (a moved or deleted file) with a visible "missing" label.
"""

from __future__ import annotations

import html
import os

from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_file
from .metrics import summarise

REPORT_FORMAT = 1
# Display order and labels; metrics absent from a run (no CLIP model, no LPIPS) are left out of tables.
METRIC_LABELS = {
    "psnr": "PSNR dB",
    "ssim": "SSIM",
    "l1": "L1",
    "lpips": "LPIPS",
    "clip_image": "CLIP img",
    "clip_direction": "CLIP dir",
}
# None: no "best" highlight (CLIP image similarity measures how much of the input survives: a trade-off, not a goal).
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "l1": False, "lpips": False, "clip_image": None, "clip_direction": True}
# Retention is undefined when the task adapter moves PSNR by less than this (dB) from the base.
RETENTION_MIN_GAIN = 1e-3
GRID_CELL = 128  # px: PNG grid cells are scaled to this width
HTML_CELL = 128  # px: displayed width of each image in report.html


def summarise_task(rows: list[dict], columns: list[str]) -> dict:
    """{column: {metric: {"mean", "ci95", "n"}}} from per-row records {"metrics": {column: {metric: value}}}."""
    out = {}
    for column in columns:
        names = [m for m in METRIC_LABELS if any(m in r["metrics"].get(column, {}) for r in rows)]
        out[column] = {m: summarise([r["metrics"][column][m] for r in rows if m in r["metrics"].get(column, {})]) for m in names}
    return out


def merge_view(rows: list[dict], summary: dict, merge_column: str, adapter_column: str | None) -> dict:
    """Retention of one merge on one task, and how close its outputs are to the task adapter's own.

    retention = (PSNR(merged) - PSNR(base)) / (PSNR(task adapter) - PSNR(base)), on the task's mean PSNR:
    1 keeps the adapter's whole gain over the base, 0 none of it. A ratio over a gain within the noise means
    nothing (issue 18: -0.09 dB gave "460%"), so it is None, with the reason in "note", unless the adapter's
    per-row gain over the base (same input, instruction and seed in both columns) has a 95% interval above zero;
    "adapter_gain" keeps that interval. `psnr_vs_task_adapter` is the PSNR between the merged and the task
    adapter's outputs on the same rows (same seed): high means the merge reproduces the adapter.
    """
    view = {"task_adapter": adapter_column, "psnr_retention": None, "psnr_vs_task_adapter": None}
    if adapter_column is None:
        view["note"] = "no adapter for this task in the eval; add it to get retention"
        return view
    merged = summary[merge_column]["psnr"]["mean"]
    adapter = summary[adapter_column]["psnr"]["mean"]
    base = summary["base"]["psnr"]["mean"]
    # the gains over the base, in dB: a retention far from [0, 1] usually means a gain within the noise
    view["merged_gain_db"], view["adapter_gain_db"] = merged - base, adapter - base
    gain = summarise([r["metrics"][adapter_column]["psnr"] - r["metrics"]["base"]["psnr"] for r in rows])
    view["adapter_gain"] = gain
    view["note"] = retention_not_applicable(gain)
    if view["note"] is None:
        view["psnr_retention"] = (merged - base) / (adapter - base)
    view["psnr_vs_task_adapter"] = summarise([r["vs_task_adapter"][merge_column] for r in rows])
    return view


def retention_not_applicable(gain: dict) -> str | None:
    """Why retention is not applicable for an adapter whose per-row gain over the base is `gain` (summarise()),
    or None when the gain is above the rows' noise (its 95% interval excludes zero, on the positive side)."""
    if abs(gain["mean"]) < RETENTION_MIN_GAIN:
        return "the task adapter's PSNR equals the base's; retention is undefined"
    if gain["ci95"] is None:
        return f"one row: the task adapter's gain ({gain['mean']:+.2f} dB) has no noise estimate"
    low, high = gain["ci95"]
    if low <= 0:
        return (f"the task adapter's gain over the base ({gain['mean']:+.2f} dB, 95% interval {low:+.2f} to "
                f"{high:+.2f} over {gain['n']} rows) is not above the rows' noise")
    return None


# --------------------------------------------------------------------------------------------- printed table
def _format_stat(stat: dict | None, digits: int) -> str:
    if not stat or stat["mean"] is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    if stat["ci95"] is not None:
        text += f" ±{(stat['ci95'][1] - stat['ci95'][0]) / 2:.{digits}f}"
    return text


def _digits(metric: str) -> int:
    return 2 if metric == "psnr" else 3


def format_table(report: dict) -> str:
    """Plain-text table per task (mean ±95% half-width), then the merge view lines."""
    data = report["data"]
    lines = [f"data {data.get('read_from') or data['source']} (split {data['split']})", describe_sampler(report["generation"])]
    for task, section in report["tasks"].items():
        metrics = [m for m in METRIC_LABELS if any(m in section["metrics"][c] for c in section["columns"])]
        lines.append(f"task {task}: {section['n_rows']} rows")
        cells = [["column"] + [METRIC_LABELS[m] for m in metrics]]
        for column in section["columns"]:
            cells.append([column] + [_format_stat(section["metrics"][column].get(m), _digits(m)) for m in metrics])
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        for row in cells:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        for merge, view in section["merges"].items():
            lines.append("  " + _merge_line(merge, view))
    for name, status in report["skipped"].items():
        lines.append(f"{name}: {status}")
    return "\n".join(lines)


def format_retention(value: float | None) -> str:
    """A merge's PSNR retention as a percentage, the one form the eval table, report.html and the demo print."""
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _merge_line(merge: str, view: dict) -> str:
    adapter = view["task_adapter"]
    if adapter is None:
        return f"merge {merge}: retention n/a ({view['note']})"
    retention = format_retention(view["psnr_retention"])
    why = f" ({view['note']})" if view["psnr_retention"] is None and view.get("note") else ""
    return (f"merge {merge}: PSNR retention {retention}{why} vs {adapter} (gain over base: merged "
            f"{view['merged_gain_db']:+.3f} dB, adapter {view['adapter_gain_db']:+.3f} dB); "
            f"PSNR to {adapter}'s outputs {_format_stat(view['psnr_vs_task_adapter'], 2)} dB")


def describe_sampler(generation: dict) -> str:
    """The sampler line of the table and report.html: values and where each came from (given, base, blog), and the
    device and dtype the images were made with."""
    from ..base import Sampler

    source = generation.get("sampler_source") or {}
    line = Sampler(generation["steps"], generation["guidance"], generation["image_guidance"], source).describe()
    if "device" in generation:  # reports written before session 21 do not record it
        from ..devices import describe

        line += "; " + describe(generation["device"], generation["dtype"])
    return line


# ----------------------------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
table.grid td { padding: 2px; text-align: center; vertical-align: top; font-size: 80%; }
table.grid img { width: CELLpx; image-rendering: pixelated; display: block; }
td.best { font-weight: bold; }
.missing { outline: 3px solid #d00; }
.missing-label { color: #d00; font-weight: bold; }
caption { text-align: left; font-weight: bold; padding: 4px 0; }
.note { color: #666; font-size: 90%; }
""".replace("CELL", str(HTML_CELL))

# Marks each image once the page has loaded: data-loaded="1" when it decoded (naturalWidth > 0), else "0" plus a
# red outline and label, so a missing file is visible instead of a silent broken icon.
_SCRIPT = """
window.addEventListener('load', function () {
  var ok = 0, bad = 0;
  Array.prototype.forEach.call(document.images, function (img) {
    var loaded = img.complete && img.naturalWidth > 0;
    img.setAttribute('data-loaded', loaded ? '1' : '0');
    if (loaded) { ok++; return; }
    bad++;
    img.classList.add('missing');
    var label = document.createElement('div');
    label.className = 'missing-label';
    label.textContent = 'missing: ' + img.getAttribute('src');
    img.parentNode.appendChild(label);
  });
  document.body.setAttribute('data-images-loaded', String(ok));
  document.body.setAttribute('data-images-missing', String(bad));
});
"""


def _metric_table(section: dict) -> str:
    metrics = [m for m in METRIC_LABELS if any(m in section["metrics"][c] for c in section["columns"])]
    best = {}
    for m in metrics:
        means = {c: section["metrics"][c][m]["mean"] for c in section["columns"] if m in section["metrics"][c]}
        if means and HIGHER_IS_BETTER[m] is not None:
            best[m] = (max if HIGHER_IS_BETTER[m] else min)(means, key=means.get)
    head = "".join(f"<th>{html.escape(METRIC_LABELS[m])}</th>" for m in metrics)
    body = []
    for column in section["columns"]:
        cells = "".join(
            f'<td class="{"best" if best.get(m) == column else ""}">'
            f'{html.escape(_format_stat(section["metrics"][column].get(m), _digits(m)))}</td>'
            for m in metrics
        )
        body.append(f"<tr><td>{html.escape(column)}</td>{cells}</tr>")
    return (f'<table class="metrics"><caption>mean ±95% interval, n = {section["n_rows"]}</caption>'
            f"<tr><th>column</th>{head}</tr>{''.join(body)}</table>")


def _merge_table(section: dict) -> str:
    if not section["merges"]:
        return ""
    rows = []
    whys = {m: html.escape(v["note"]) if v["psnr_retention"] is None and v.get("note") else "" for m, v in section["merges"].items()}
    for merge, view in section["merges"].items():
        retention = html.escape(format_retention(view["psnr_retention"]))
        close = _format_stat(view["psnr_vs_task_adapter"], 2)
        gains = [view.get("merged_gain_db"), view.get("adapter_gain_db")]
        gains = ["-" if g is None else f"{g:+.3f}" for g in gains]
        why = f'<td class="note">{whys[merge]}</td>' if any(whys.values()) else ""  # the column only when a row needs it
        rows.append(f"<tr><td>{html.escape(merge)}</td><td>{html.escape(str(view['task_adapter']))}</td>"
                    f"<td>{retention}</td><td>{gains[0]}</td><td>{gains[1]}</td><td>{html.escape(close)}</td>{why}</tr>")
    return ('<table class="merges"><caption>merge view: retention = (merged - base) / (adapter - base) on PSNR'
            "</caption><tr><th>merge</th><th>task adapter</th><th>PSNR retention</th><th>merged gain (dB)</th>"
            "<th>adapter gain (dB)</th><th>PSNR to adapter outputs (dB)</th>"
            f"{'<th>retention n/a because</th>' if any(whys.values()) else ''}</tr>{''.join(rows)}</table>")


def _grid_table(task_folder: str, section: dict) -> str:
    columns = ["input", "target"] + section["columns"]
    head = "<th>row</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in section["rows"]:
        cells = []
        for column in columns:
            src = "/".join(["images", task_folder, section["folders"][column], f"{row['row']}.png"])
            cells.append(f'<td><img src="{html.escape(src)}" alt="{html.escape(column)} row {row["row"]}"></td>')
        label = f'{row["row"]}<br><span class="note">{html.escape(row["instruction"])}</span>'
        body.append(f"<tr><td>{label}</td>{''.join(cells)}</tr>")
    return f'<table class="grid"><tr>{head}</tr>{"".join(body)}</table>'


def render_html(report: dict) -> str:
    gen = report["generation"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>adapterkit eval</title>',
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
        "<h1>adapterkit eval</h1>",
        f'<p>base <code>{html.escape(str(report["base"]["name_or_path"]))}</code> '
        f'(fingerprint <code>{html.escape(str(report["base"]["fingerprint"]))}</code>); data '
        f'<code>{html.escape(str(report["data"].get("read_from") or report["data"]["source"]))}</code> split {html.escape(str(report["data"]["split"]))}; '
        f'{html.escape(describe_sampler(gen))}; resolution {gen["resolution"]}, seed {gen["seed"]} + row.</p>',
    ]
    for name, status in report["skipped"].items():
        parts.append(f'<p class="note">{html.escape(name)}: {html.escape(status)}</p>')
    for task, section in report["tasks"].items():
        parts.append(f"<h2>{html.escape(task)}</h2>")
        parts.append(_metric_table(section))
        parts.append(_merge_table(section))
        parts.append(_grid_table(section["folder"], section))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(path: str, report: dict) -> None:
    with atomic_file(path, "w") as f:
        f.write(render_html(report))


# -------------------------------------------------------------------------------------------------- PNG grid
def grid_image(columns: list[str], rows: list[list[Image.Image]], cell: int = GRID_CELL) -> Image.Image:
    """One PNG: a label row, then one row of cells per example; every image scaled to `cell` px wide."""
    font = ImageFont.load_default()
    heights = [max(round(im.height * cell / im.width) for im in row) for row in rows] or [cell]
    label_h, pad = 16, 2
    width = len(columns) * (cell + pad) + pad
    height = label_h + sum(h + pad for h in heights) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(columns):
        draw.text((pad + i * (cell + pad) + 2, 2), name[:20], fill="black", font=font)
    y = label_h
    for row, h in zip(rows, heights):
        for i, im in enumerate(row):
            scaled = im.resize((cell, round(im.height * cell / im.width)), Image.NEAREST)
            canvas.paste(scaled, (pad + i * (cell + pad), y))
        y += h + pad
    return canvas


def write_grid(path: str, columns: list[str], rows: list[list[Image.Image]]) -> None:
    with atomic_file(path) as f:
        grid_image(columns, rows).save(f, format="PNG")


def grid_rows(output: str, section: dict) -> tuple[list[str], list[list[Image.Image]]]:
    """Labels and the images of one task's grid, read back from the saved PNGs."""
    columns = ["input", "target"] + section["columns"]
    rows = []
    for row in section["rows"]:
        images = []
        for column in columns:
            path = os.path.join(output, "images", section["folder"], section["folders"][column], f"{row['row']}.png")
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        rows.append(images)
    return columns, rows

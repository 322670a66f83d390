"""The self-contained HTML report: tables, embedded plots, and every prompt escaped.

The page loads nothing from the network: plots are inlined as base64 PNG and the table
sorting is a few lines of inline JavaScript. Every string that comes from a prompt file,
an attack or a config passes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

_COLUMNS = [
    ("model", "model"),
    ("defense", "defense"),
    ("attack", "attack"),
    ("concept", "concept"),
    ("n_cases", "cases"),
    ("pre_asr", "pre-ASR"),
    ("asr", "ASR"),
    ("asr_ci95", "ASR 95% CI"),
    ("attack_only_asr", "attack-only ASR"),
    ("latency_ms_per_image", "latency ms (median)"),
    ("throughput_images_per_s", "images/s"),
    ("defense_overhead", "overhead"),
    ("ssim_to_undefended", "SSIM to undefended"),
    ("prompt_accuracy", "prompt accuracy"),
    ("attack_seconds_per_case", "attack s/case"),
    ("attack_model_calls_per_case", "attack calls/case"),
]

_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, index) {
  th.addEventListener('click', function () {
    var table = th.closest('table');
    var body = table.tBodies[0];
    var rows = Array.from(body.rows);
    var ascending = th.dataset.order !== 'asc';
    th.dataset.order = ascending ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[index].dataset.value, y = b.cells[index].dataset.value;
      var nx = parseFloat(x), ny = parseFloat(y);
      var result = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return ascending ? result : -result;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f0f0f0; cursor: pointer; }
img.plot { max-width: 100%; margin: 0.5em 0; }
code, pre { background: #f7f7f7; }
"""


def _format(key: str, value: Any) -> tuple[str, str]:
    """Display text and sort value of one summary field."""
    if value is None:
        return "n/a", ""
    if key == "asr_ci95":
        return f"[{value[0]:.2f}, {value[1]:.2f}]", str(value[0])
    if key == "latency_ms_per_image":
        median = value.get("median")
        return ("n/a", "") if median is None else (f"{median:.1f}", str(median))
    if isinstance(value, float):
        return f"{value:.3f}", repr(value)
    return str(value), str(value)


def _sortable_table(head: str, rows: list[str]) -> str:
    body = "".join(rows)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cells_table(cells: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in _COLUMNS)
    body = []
    for cell in cells:
        tds = []
        for key, _ in _COLUMNS:
            text, sort_value = _format(key, cell.get(key))
            tds.append(f'<td data-value="{html.escape(sort_value)}">{html.escape(text)}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return _sortable_table(head, body)


def _prompts_table(rows: list[dict[str, Any]], limit: int = 300) -> str:
    """Render the prompts each cell generated from, original and adversarial, escaped."""
    seen = set()
    lines = []
    for row in rows:
        key = (row["defense"], row["attack"], row["concept"], row["case_id"])
        if key in seen or row["seed_index"] != 0:
            continue
        seen.add(key)
        cells = [
            row["defense"],
            row["attack"],
            row["concept"],
            row["case_id"],
            row["prompt"],
            "yes" if row["truncated"] else "no",
            "yes" if row["present"] else "no",
            f"{row['score']:.3f}",
        ]
        tds = "".join(
            f'<td data-value="{html.escape(str(c))}">{html.escape(str(c))}</td>' for c in cells
        )
        lines.append(f"<tr>{tds}</tr>")
        if len(lines) >= limit:
            break
    head = "".join(
        f"<th>{title}</th>"
        for title in (
            "defense",
            "attack",
            "concept",
            "case",
            "prompt",
            "truncated",
            "concept present",
            "score",
        )
    )
    return _sortable_table(head, lines)


def _embedded_plot(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_html(
    summary: dict[str, Any], path: Path, plots: list[Path], images: list[dict[str, Any]]
) -> Path:
    run = summary["run"]
    environment = run["environment"]
    cells = summary["cells"]
    judges = {json.dumps(cell["evaluator"], sort_keys=True) for cell in cells}
    models = sorted({cell["model"] for cell in summary["cells"]})
    meta = [
        ("run", run["name"]),
        ("models", ", ".join(models)),
        ("evaluator presets", "; ".join(sorted(judges))),
        ("sampler", "; ".join(sorted({json.dumps(c["sampler"], sort_keys=True) for c in cells}))),
        ("seeds", json.dumps(run["seeds"], sort_keys=True)),
        ("case verdict", f"{run['aggregation']} of the images per case"),
        ("device", f"{environment['device']} ({environment['device_name']})"),
        ("packages", json.dumps(environment["packages"], sort_keys=True)),
        ("python", environment["python"]),
        ("resources", json.dumps(run.get("resources"), sort_keys=True)),
    ]
    meta_rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>"
        for key, value in meta
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>erasure-arena report: {html.escape(run["name"])}</title>
<style>{_STYLE}</style></head>
<body>
<h1>erasure-arena report: {html.escape(run["name"])}</h1>
<table>{meta_rows}</table>
<h2>Cells</h2>
<p>pre-ASR: share of cases whose unmodified prompt shows the concept on the defended model.
ASR counts pre-successes too; attack-only ASR is over the cases the unmodified prompt
did not break. Latency is the median single-image time; overhead is defended over
undefended time, measured interleaved.</p>
{_cells_table(summary["cells"])}
<h2>Plots</h2>
{"".join(_embedded_plot(p) for p in plots)}
<h2>Prompts</h2>
{_prompts_table(images)}
<script>{_SCRIPT}</script>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path

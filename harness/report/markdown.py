"""`summary.md`: the cell table as Markdown, one section per concept, ready for a paper."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _interval(interval: list[float] | None) -> str:
    if not interval:
        return "n/a"
    return f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


HEADER = (
    "| defense | attack | cases | pre-ASR % | ASR % | ASR 95% CI | attack-only ASR % "
    "| overhead | latency ms | attack s/case | SSIM | prompt acc. % |\n"
    "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n"
)


def summary_markdown(summary: dict[str, Any]) -> str:
    run = summary["run"]
    lines = [f"# {run['name']}\n"]
    concepts = list(dict.fromkeys(cell["concept"] for cell in summary["cells"]))
    for concept in concepts:
        rows = [cell for cell in summary["cells"] if cell["concept"] == concept]
        judge = rows[0].get("evaluator") or {}
        lines.append(f"\n## {_escape(concept)}\n")
        lines.append(
            f"Judge: `{judge.get('evaluator')}` preset `{judge.get('preset')}`,"
            f" threshold {judge.get('threshold')}; {rows[0]['images_per_case']:g} image(s)"
            f" per case, verdict: {rows[0]['aggregation']}.\n\n"
        )
        lines.append(HEADER)
        for cell in rows:
            defense = f"{cell['run']}: {cell['defense']}" if cell.get("run") else cell["defense"]
            latency = (cell.get("latency_ms_per_image") or {}).get("median")
            lines.append(
                f"| {_escape(defense)} | {_escape(cell['attack'])} | {cell['n_cases']} "
                f"| {_percent(cell['pre_asr'])} | {_percent(cell['asr'])} "
                f"| {_interval(cell['asr_ci95'])} | {_percent(cell['attack_only_asr'])} "
                f"| {_number(cell['defense_overhead'])} | {_number(latency, 1)} "
                f"| {_number(cell['attack_seconds_per_case'], 1)} "
                f"| {_number(cell.get('ssim_to_undefended'), 3)} "
                f"| {_percent(cell.get('prompt_accuracy'))} |\n"
            )
    sampler = run["sampler"]
    lines.append(
        f"\nSampler: {sampler.get('scheduler')}, steps {sampler.get('steps') or 'model default'},"
        f" guidance {sampler.get('guidance') or 'model default'}."
        " ASR includes pre-successes; intervals are percentile bootstrap over cases.\n"
    )
    return "".join(lines)


def write_markdown(summary: dict[str, Any], path: Path) -> Path:
    path.write_text(summary_markdown(summary), encoding="utf-8")
    return path

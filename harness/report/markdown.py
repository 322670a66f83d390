"""`summary.md`: the cell tables as Markdown, ready for a paper.

One section per concept with every cell, then two compact tables where the run has them:
defenses by task (unattacked forget, retain and benign prompts) and attacks by defense.
"""

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
            defense = _label(cell)
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
    lines.extend(defense_table(summary["cells"]))
    lines.extend(attack_table(summary["cells"]))
    sampler = run["sampler"]
    lines.append(
        f"\nSampler: {sampler.get('scheduler') or 'model default'},"
        f" steps {sampler.get('steps') or 'model default'},"
        f" guidance {sampler.get('guidance') or 'model default'}."
        " ASR includes pre-successes; intervals are percentile bootstrap over cases.\n"
    )
    return "".join(lines)


def _label(cell: dict[str, Any]) -> str:
    return f"{cell['run']}: {cell['defense']}" if cell.get("run") else cell["defense"]


def defense_table(cells: list[dict[str, Any]]) -> list[str]:
    """Unattacked cells by defense and task: what each defense erases and what it costs.

    Columns come from the cells' roles: pre-ASR on forget prompts, the concept rate and the
    judge's prompt accuracy on retain and benign prompts, SSIM of benign images to the
    undefended ones, and the overhead on forget prompts. Empty when no cell has a task.
    """
    plain = [cell for cell in cells if cell["attack"] == "none" and cell.get("task")]
    roles = {cell.get("role") for cell in plain}
    if not plain or "forget" not in roles or len(roles) < 2:
        return []
    lines = [
        "\n## Defenses by task (no attack)\n\n",
        "| defense | task | pre-ASR % (forget) | 95% CI | concept % (retain) "
        "| prompt acc. % (retain) | concept % (benign) | prompt acc. % (benign) "
        "| SSIM (benign) | overhead |\n",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|\n",
    ]
    by_key = {(_label(cell), cell["task"], cell.get("role")): cell for cell in plain}
    rows = dict.fromkeys((_label(cell), cell["task"]) for cell in plain)
    for defense, task in rows:
        forget = by_key.get((defense, task, "forget"))
        retain = by_key.get((defense, task, "retain")) or {}
        benign = by_key.get((defense, task, "benign")) or {}
        if forget is None:
            continue
        lines.append(
            f"| {_escape(defense)} | {_escape(task)} | {_percent(forget['pre_asr'])} "
            f"| {_interval(forget['pre_asr_ci95'])} | {_percent(retain.get('pre_asr'))} "
            f"| {_percent(retain.get('prompt_accuracy'))} | {_percent(benign.get('pre_asr'))} "
            f"| {_percent(benign.get('prompt_accuracy'))} "
            f"| {_number(benign.get('ssim_to_undefended'), 3)} "
            f"| {_number(forget['defense_overhead'])} |\n"
        )
    return lines


def attack_table(cells: list[dict[str, Any]]) -> list[str]:
    """Attacked forget cells, one row per (task, defense): pre-ASR, then each attack's
    ASR with its cost in seconds per case. Empty without at least one attack."""
    forget = [cell for cell in cells if cell.get("role", "forget") == "forget"]
    attacks = list(dict.fromkeys(cell["attack"] for cell in forget if cell["attack"] != "none"))
    if not attacks:
        return []
    lines = [
        "\n## Attacks by defense (forget prompts; ASR %, attack seconds per case)\n\n",
        "| task | defense | pre-ASR % | " + " | ".join(_escape(a) for a in attacks) + " |\n",
        "|---|---|---:|" + "---:|" * len(attacks) + "\n",
    ]
    by_key = {(cell.get("task") or cell["concept"], _label(cell), cell["attack"]): cell
              for cell in forget}
    rows = dict.fromkeys((task, defense) for task, defense, _ in by_key)
    for task, defense in rows:
        plain = by_key.get((task, defense, "none"))
        entries = []
        for attack in attacks:
            cell = by_key.get((task, defense, attack))
            entries.append("" if cell is None else f"{_percent(cell['asr'])} "
                           f"({_number(cell['attack_seconds_per_case'], 1)} s)")
        pre = _percent(plain["pre_asr"]) if plain else "n/a"
        lines.append(f"| {_escape(task)} | {_escape(defense)} | {pre} | "
                     + " | ".join(entries) + " |\n")
    return lines


def write_markdown(summary: dict[str, Any], path: Path) -> Path:
    path.write_text(summary_markdown(summary), encoding="utf-8")
    return path

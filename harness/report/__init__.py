"""Summary, plots and the HTML report of a run, all derived from the ledger."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harness.ledger import Ledger
from harness.report.html import write_html
from harness.report.markdown import write_markdown
from harness.report.plots import write_plots
from harness.summary import write_summary

log = logging.getLogger(__name__)


def write_outputs(out_dir: str | Path) -> dict[str, Any]:
    """Write `summary.json`, `summary.md`, the plots and `report/report.html` for `out_dir`."""
    out_dir = Path(out_dir)
    summary = write_summary(out_dir)
    write_markdown(summary, out_dir / "summary.md")
    report_dir = out_dir / "report"
    report_dir.mkdir(exist_ok=True)
    ledger = Ledger(out_dir)
    try:
        images, prompts = ledger.images(), ledger.adversarial_prompts()
    finally:
        ledger.close()
    plots = write_plots(summary, report_dir, out_dir, images, prompts)
    write_html(summary, report_dir / "report.html", plots, images)
    log.info("wrote summary (%d cells) and report to %s", len(summary["cells"]), report_dir)
    return summary

"""Summary, plots and the HTML report of a run, all derived from the ledger."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harness.report.html import write_html
from harness.report.plots import write_plots
from harness.summary import write_summary

log = logging.getLogger(__name__)


def write_outputs(out_dir: str | Path) -> dict[str, Any]:
    """Write `summary.json`, `report/*.png` and `report/report.html` for `out_dir`."""
    out_dir = Path(out_dir)
    summary = write_summary(out_dir)
    report_dir = out_dir / "report"
    report_dir.mkdir(exist_ok=True)
    plots = write_plots(summary, report_dir)
    write_html(summary, out_dir, report_dir / "report.html", plots)
    log.info("wrote summary (%d cells) and report to %s", len(summary["cells"]), report_dir)
    return summary

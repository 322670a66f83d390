"""Report outputs: Markdown tables, plots, comparison of runs, and the page in a browser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-run")
    assert main(["run", str(SMOKE), "--out", str(out), "--no-progress"]) == 0
    return out


def test_summary_markdown_has_a_row_per_cell(run_dir):
    text = (run_dir / "summary.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) == len(summary["cells"]) + 1  # plus the header row
    assert "preset `nudenet-six`" in text


def test_plots_written_as_png_and_svg(run_dir):
    report = run_dir / "report"
    for stem in ("asr_heatmap_nudity", "asr_bars_nudity", "pre_vs_asr_nudity", "asr_vs_overhead"):
        assert (report / f"{stem}.png").stat().st_size > 0
        assert (report / f"{stem}.svg").read_text().lstrip().startswith("<?xml")


def test_fidelity_fields_for_defended_cells(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    cells = {cell["defense"]: cell for cell in summary["cells"]}
    assert cells["none"]["ssim_to_undefended"] is None
    ssim = cells["negative-prompt"]["ssim_to_undefended"]
    assert 0 < ssim < 1, "a negative prompt changes the tiny model's images somewhat"
    assert cells["negative-prompt"]["fid"] is None  # no Inception weights configured


def test_compare_overlays_runs(run_dir, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(run_dir, second)
    out = tmp_path / "comparison"
    assert main(["compare", str(run_dir), str(second), "--out", str(out)]) == 0
    combined = json.loads((out / "summary.json").read_text())
    assert len(combined["cells"]) == 4
    assert {cell["run"] for cell in combined["cells"]} == {run_dir.name, "second"}
    assert (out / "report" / "report.html").is_file()
    assert f"{run_dir.name}: negative-prompt" in (out / "summary.md").read_text()


def test_compare_check_copy_and_changed_run(run_dir, tmp_path, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all(len(cell["images_sha256"]) == 64 for cell in summary["cells"])

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["compare", str(run_dir), str(copy), "--out", str(tmp_path / "a"), "--check"]) == 0
    assert "2 of 2 cells reproduced; images compared in 2" in capsys.readouterr().out

    changed = tmp_path / "changed"
    changed.mkdir()
    cells = summary["cells"]
    cells[0] = {**cells[0], "images_sha256": "0" * 64}
    cells[1] = {**cells[1], "asr": 2.0, "asr_ci95": [2.0, 2.0]}
    (changed / "summary.json").write_text(json.dumps(summary))
    assert main(["compare", str(run_dir), str(changed), "--out", str(tmp_path / "b"),
                 "--check"]) == 1
    out = capsys.readouterr().out
    assert "0 of 2 cells reproduced" in out
    assert "images differ" in out
    assert "ASR" in out


def test_compare_missing_summary_fails_cleanly(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no summary.json" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package chromium)")
def test_report_renders_in_headless_chromium(run_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    page_path = run_dir / "report" / "report.html"
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page()
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "request", lambda request: request.url.startswith("http") and errors.append(request.url)
        )
        page.goto(page_path.as_uri())
        tables = page.locator("table.sortable").count()
        broken_images = page.evaluate(
            "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"
        )
        image_count = page.evaluate("document.images.length")

        # Clicking a header sorts the rows: the first column's cells end up ordered.
        page.locator("table.sortable th").nth(1).click()
        first_column = page.evaluate(
            "Array.from(document.querySelector('table.sortable').tBodies[0].rows)"
            ".map(r => r.cells[1].dataset.value)"
        )
        browser.close()

    assert errors == []
    assert tables == 2
    assert image_count >= 4
    assert broken_images == 0
    assert first_column == sorted(first_column)


def _cell(defense, attack, concept, role, pre, asr=None, **extra):
    asr = pre if asr is None else asr
    return {"model": "m", "defense": defense, "attack": attack, "concept": concept,
            "task": "star", "role": role, "pre_asr": pre, "pre_asr_ci95": [pre, pre],
            "asr": asr, "asr_ci95": [asr, asr], "defense_overhead": 1.5,
            "attack_seconds_per_case": 2.0 if attack != "none" else 0.0, **extra}


def test_paper_tables_by_defense_and_by_attack():
    from harness.report.markdown import attack_table, defense_table

    cells = [
        _cell("none", "none", "star", "forget", 0.9),
        _cell("none", "p4d-n", "star", "forget", 0.9, 1.0),
        _cell("none", "none", "star-benign", "benign", 0.0, prompt_accuracy=0.75,
              ssim_to_undefended=None),
        _cell("uce", "none", "star", "forget", 0.1),
        _cell("uce", "p4d-n", "star", "forget", 0.1, 0.5),
        _cell("uce", "none", "star-benign", "benign", 0.0, prompt_accuracy=0.5,
              ssim_to_undefended=0.8),
    ]
    defenses = "".join(defense_table(cells))
    expected = "| uce | star | 10.0 | [10.0, 10.0] | n/a | n/a | 0.0 | 50.0 | 0.800 | 1.50 |"
    assert expected in defenses
    attacks = "".join(attack_table(cells))
    assert "| task | defense | pre-ASR % | p4d-n |" in attacks
    assert "| star | uce | 10.0 | 50.0 (2.0 s) |" in attacks
    assert attack_table([cell for cell in cells if cell["attack"] == "none"]) == []

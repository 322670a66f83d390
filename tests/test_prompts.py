"""Tests for the prompt-set loaders, on the published prompt files and on small temp files.

The published files live in a folder next to the repository (`DATA`). Tests that read them
are skipped when that folder is absent. Expected counts and values are recomputed here with
the csv and json modules, independently of the loaders.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from harness.prompts import (
    Case,
    CsvPromptSet,
    IgmuPromptSet,
    InlinePromptSet,
    PromptSetError,
    RingABellPairs,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SMOKE_CSV = REPO / "configs" / "prompts" / "smoke.csv"

needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"published prompt files not found at {DATA}"
)

# Row counts of the published files as documented with them, and recounted when writing
# these tests. They catch a parser that splits or merges rows, such as one that mishandles
# quoted newlines, which a recount with the csv module would share.
DOCUMENTED_ROWS = {
    "unlearndiffatk/nudity.csv": 142,
    "unlearndiffatk/i2p.csv": 4703,
    "unlearndiffatk/violence.csv": 756,
    "unlearndiffatk/illegal.csv": 727,
    "unlearndiffatk/vangogh.csv": 50,
    "unlearndiffatk/church.csv": 50,
    "unlearndiffatk/parachute.csv": 50,
    "unlearndiffatk/garbage_truck.csv": 50,
    "unlearndiffatk/tench.csv": 50,
    "unlearndiffatk/coco_10k.csv": 9969,
    "p4d/unsafe-prompts-nudity_sldSTRONG.csv": 112,
    "p4d/unsafe-prompts-nudity_std_neg.csv": 209,
    "p4d/coco30k-car_esd.csv": 91,
    "p4d/small_imagenet_prompts_frenchhorn200.csv": 200,
}


def read_rows(path: Path) -> list[dict[str, str]]:
    """Read a CSV file with the csv module, as the independent reference."""
    with open(path, newline="", encoding="utf-8-sig") as file:
        return list(csv.DictReader(file))


def prompt_csv_files() -> list[str]:
    """Relative paths of the published CSV files that have a `prompt` column."""
    if not DATA.is_dir():
        return []
    files = []
    for path in sorted(DATA.rglob("*.csv")):
        with open(path, newline="", encoding="utf-8-sig") as file:
            header = next(csv.reader(file))
        if "prompt" in header:
            files.append(path.relative_to(DATA).as_posix())
    return files


# --- csv -------------------------------------------------------------------------------------


@needs_data
def test_documented_files_present():
    found = set(prompt_csv_files())
    missing = sorted(set(DOCUMENTED_ROWS) - found)
    assert not missing, f"published prompt files not found: {missing}"


@needs_data
@pytest.mark.parametrize("relative", prompt_csv_files())
def test_csv_loader_on_published_file(relative):
    path = DATA / relative
    rows = read_rows(path)
    cases = CsvPromptSet(path=str(path), concept="test").load()

    expected_rows = [row for row in rows if row["prompt"].strip()]
    assert len(cases) == len(expected_rows)
    if relative in DOCUMENTED_ROWS:
        assert len(cases) == DOCUMENTED_ROWS[relative]

    assert [case.prompt for case in cases] == [row["prompt"] for row in expected_rows]
    assert {case.concept for case in cases} == {"test"}
    if "case_number" in rows[0]:
        assert [case.case_id for case in cases] == [
            row["case_number"].strip() for row in expected_rows
        ]
    if "evaluation_seed" in rows[0]:
        assert [case.seed for case in cases] == [
            int(row["evaluation_seed"]) for row in expected_rows
        ]
    else:
        assert all(case.seed is None for case in cases)
    if "evaluation_guidance" in rows[0]:
        assert [case.guidance for case in cases] == [
            float(row["evaluation_guidance"]) for row in expected_rows
        ]
    else:
        assert all(case.guidance is None for case in cases)

    first_column = next(iter(rows[0]))
    if first_column in ("", "Unnamed: 0"):
        assert [case.extra["source_index"] for case in cases] == [
            row[first_column] for row in expected_rows
        ]


@needs_data
def test_csv_keeps_multiline_prompts_intact():
    path = DATA / "unlearndiffatk" / "i2p.csv"
    expected = {row["case_number"]: row["prompt"] for row in read_rows(path)}
    multiline = [case_id for case_id, prompt in expected.items() if "\n" in prompt]
    assert multiline, "i2p.csv was expected to hold prompts with line breaks"

    cases = {case.case_id: case for case in CsvPromptSet(path=path, concept="nudity").load()}
    for case_id in multiline:
        assert cases[case_id].prompt == expected[case_id]


@needs_data
def test_csv_extra_columns_from_i2p():
    path = DATA / "unlearndiffatk" / "nudity.csv"
    rows = read_rows(path)
    case = CsvPromptSet(path=path, concept="nudity").load()[0]

    assert case.extra["categories"] == rows[0]["categories"]
    assert case.extra["nudity_percentage"] == rows[0]["nudity_percentage"]
    assert "prompt" not in case.extra
    assert "evaluation_seed" not in case.extra


@needs_data
def test_csv_on_ring_a_bell_parts_file_raises():
    path = DATA / "ring-a-bell" / "Nudity_prompt.csv"
    with pytest.raises(PromptSetError) as error:
        CsvPromptSet(path=path, concept="nudity").load()
    message = str(error.value)
    assert "Nudity_prompt.csv" in message
    assert "prompt" in message


def test_csv_offset_and_limit(tmp_path):
    path = tmp_path / "ten.csv"
    lines = ["case_number,prompt"] + [f"{n},prompt {n}" for n in range(10)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    cases = CsvPromptSet(path=path, concept="c", offset=3, limit=4).load()
    assert [case.case_id for case in cases] == ["3", "4", "5", "6"]
    assert len(CsvPromptSet(path=path, concept="c", offset=8, limit=4).load()) == 2
    with pytest.raises(PromptSetError, match="limit"):
        CsvPromptSet(path=path, concept="c", limit=-1).load()


def test_csv_row_index_without_case_number(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("prompt,evaluation_seed\nfirst,5\nsecond,6\n", encoding="utf-8")

    cases = CsvPromptSet(path=path, concept="c").load()
    assert [case.case_id for case in cases] == ["0", "1"]
    assert [case.seed for case in cases] == [5, 6]


def test_csv_prompt_column_option(tmp_path):
    path = tmp_path / "text.csv"
    path.write_text("case_number,text\n0,a red car\n", encoding="utf-8")

    cases = CsvPromptSet(path=path, concept="car", prompt_column="text").load()
    assert cases[0].prompt == "a red car"


def test_csv_bom_stripped(tmp_path):
    path = tmp_path / "bom.csv"
    text = "prompt,case_number,evaluation_seed\nnaïve café 🎨,7,42\n"
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))

    cases = CsvPromptSet(path=path, concept="c").load()
    assert cases[0].prompt == "naïve café 🎨"
    assert cases[0].case_id == "7"
    assert cases[0].seed == 42


def test_csv_utf16_with_bom(tmp_path):
    path = tmp_path / "utf16.csv"
    path.write_bytes("case_number,prompt\n3,a café\n".encode("utf-16"))

    cases = CsvPromptSet(path=path, concept="c").load()
    assert [(case.case_id, case.prompt) for case in cases] == [("3", "a café")]


def test_csv_mixed_encoding(tmp_path, caplog):
    path = tmp_path / "mixed.csv"
    utf8_part = "case_number,prompt\n0,a café in Paris\n".encode()
    cp1252_part = "1,a naïve painting – oil\n".encode("cp1252")
    path.write_bytes(utf8_part + cp1252_part)

    with caplog.at_level(logging.WARNING):
        cases = CsvPromptSet(path=path, concept="c").load()

    assert [case.prompt for case in cases] == ["a café in Paris", "a naïve painting – oil"]
    warnings = [record.getMessage() for record in caplog.records]
    assert any("mixed.csv" in message and "cp1252" in message for message in warnings)


def test_csv_blank_prompts_skipped_and_logged(tmp_path, caplog):
    path = tmp_path / "blank.csv"
    path.write_text('case_number,prompt\n0,kept\n1,"  "\n2,\n3,also kept\n', encoding="utf-8")

    with caplog.at_level(logging.WARNING):
        cases = CsvPromptSet(path=path, concept="c").load()

    assert [case.case_id for case in cases] == ["0", "3"]
    warnings = [record.getMessage() for record in caplog.records]
    assert any("skipped 2 case(s) with a blank prompt" in message for message in warnings)


def test_csv_missing_column_raises(tmp_path):
    path = tmp_path / "nocolumn.csv"
    path.write_text("case_number,text\n0,a dog\n", encoding="utf-8")

    with pytest.raises(PromptSetError) as error:
        CsvPromptSet(path=path, concept="c").load()
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "nocolumn.csv" in message
    assert "prompt" in message


def test_csv_missing_file_raises(tmp_path):
    path = tmp_path / "absent.csv"
    with pytest.raises(PromptSetError, match="absent.csv"):
        CsvPromptSet(path=path, concept="c").load()


def test_csv_bad_values_raise(tmp_path):
    seed_path = tmp_path / "seed.csv"
    seed_path.write_text("prompt,evaluation_seed\na,7.0\nb,seven\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match=r"line 3.*evaluation_seed.*'seven'"):
        CsvPromptSet(path=seed_path, concept="c").load()

    short_path = tmp_path / "short.csv"
    short_path.write_text("case_number,prompt,evaluation_seed\n0,a\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match="line 2 has 2 fields"):
        CsvPromptSet(path=short_path, concept="c").load()

    duplicate_path = tmp_path / "duplicate.csv"
    duplicate_path.write_text("case_number,prompt\n1,a\n1,b\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match="unique"):
        CsvPromptSet(path=duplicate_path, concept="c").load()


def test_csv_seed_written_as_float(tmp_path):
    path = tmp_path / "float_seed.csv"
    path.write_text("prompt,evaluation_seed,evaluation_guidance\na,7.0,\n", encoding="utf-8")

    case = CsvPromptSet(path=path, concept="c").load()[0]
    assert case.seed == 7
    assert case.guidance is None


def test_csv_options_checked():
    with pytest.raises(PromptSetError, match="concept"):
        CsvPromptSet(path="x.csv")
    with pytest.raises(PromptSetError, match="unknown option"):
        CsvPromptSet(path="x.csv", concept="c", seeds=[1])


# --- smoke prompt file -------------------------------------------------------------------------


def test_smoke_prompt_file():
    cases = CsvPromptSet(path=SMOKE_CSV, concept="nudity").load()

    assert len(cases) == 6
    assert all(case.seed is not None and case.guidance is not None for case in cases)
    assert any("<script>alert(1)</script>" in case.prompt for case in cases)
    # Every word and every punctuation mark is at least one CLIP token, so this count is a
    # lower bound on the token count, and more than 77 pieces overflow SD's 77-token window.
    longest = max(len(re.findall(r"\w+|[^\w\s]", case.prompt)) for case in cases)
    assert longest > 77


# --- ring-a-bell-pairs -------------------------------------------------------------------------


@needs_data
def test_ring_a_bell_nudity_pairs():
    parts_path = DATA / "ring-a-bell" / "Nudity_prompt.csv"
    safe_path = DATA / "ring-a-bell" / "NoNudity_prompt.csv"
    parts = read_rows(parts_path)
    safe = read_rows(safe_path)

    cases = RingABellPairs(path=parts_path, safe_path=safe_path).load()

    assert len(cases) == len(parts) == len(safe) == 50
    for case, row, safe_row in zip(cases, parts, safe, strict=True):
        if row["people"].strip() == "None":
            words = [row["nudity"], ",", row["location"]]
        else:
            words = [row["nudity"], row["people"], ",", row["location"]]
        expected = " ".join(" ".join(words).split()).replace(" ,", ",")
        assert case.prompt == expected
        assert case.safe_prompt == safe_row["prompt"]
        assert case.seed == int(row["evaluation_seed"])
        assert case.case_id == row["case_number"]
        assert case.concept == "nudity"
        assert "None" not in case.prompt


@needs_data
def test_ring_a_bell_violence_pairs():
    path = DATA / "ring-a-bell" / "Violence_30.csv"
    rows = read_rows(path)

    cases = RingABellPairs(path=path).load()

    assert len(cases) == len(rows) == 30
    assert [case.prompt for case in cases] == [row["prompt"] for row in rows]
    assert [case.safe_prompt for case in cases] == [row["prompt1"] for row in rows]
    assert [case.seed for case in cases] == [int(row["evaluation_seed"]) for row in rows]
    assert {case.concept for case in cases} == {"violence"}


@needs_data
def test_ring_a_bell_option_errors():
    parts_path = DATA / "ring-a-bell" / "Nudity_prompt.csv"
    with pytest.raises(PromptSetError, match="safe_path"):
        RingABellPairs(path=parts_path).load()

    violence_path = DATA / "ring-a-bell" / "Violence_30.csv"
    with pytest.raises(PromptSetError, match="safe_path"):
        RingABellPairs(path=violence_path, safe_path=parts_path).load()


def test_ring_a_bell_misaligned_files_raise(tmp_path):
    parts_path = tmp_path / "parts.csv"
    parts_path.write_text(
        "case_number,nudity,people,clothes,location,evaluation_seed\n"
        "0,nude,women,None,on the beach,1\n"
        "1,sculpture,None,cover,in the museum,2\n",
        encoding="utf-8",
    )
    short_safe = tmp_path / "short_safe.csv"
    short_safe.write_text("case_number,prompt\n0,women on the beach\n", encoding="utf-8")
    swapped_safe = tmp_path / "swapped_safe.csv"
    swapped_safe.write_text(
        "case_number,prompt\n1,a sculpture\n0,women on the beach\n", encoding="utf-8"
    )

    with pytest.raises(PromptSetError, match="row-aligned"):
        RingABellPairs(path=parts_path, safe_path=short_safe).load()
    with pytest.raises(PromptSetError, match="does not match"):
        RingABellPairs(path=parts_path, safe_path=swapped_safe).load()


def test_ring_a_bell_unknown_layout_raises(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("case_number,text\n0,a\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match="other.csv.*prompt1"):
        RingABellPairs(path=path).load()


# --- igmu --------------------------------------------------------------------------------------


def igmu_paths() -> tuple[Path, Path]:
    return DATA / "saferedir" / "IGMU_forgot.json", DATA / "saferedir" / "IGMU_retain.json"


@needs_data
@pytest.mark.parametrize("task", ["Nudity", "VanGogh"])
def test_igmu_aligned_tasks(task):
    forget_path, retain_path = igmu_paths()
    forget = json.loads(forget_path.read_text(encoding="utf-8"))[task]
    retain = json.loads(retain_path.read_text(encoding="utf-8"))[task]

    cases = IgmuPromptSet(forget_path=forget_path, retain_path=retain_path, task=task).load()

    expected_prompts = [prompt for prompts in forget.values() for prompt in prompts]
    expected_safe = [prompt for prompts in retain.values() for prompt in prompts]
    assert len(cases) == len(expected_prompts) == 250
    assert [case.prompt for case in cases] == expected_prompts
    assert [case.safe_prompt for case in cases] == expected_safe
    assert {case.concept for case in cases} == {task.lower()}
    assert len({case.case_id for case in cases}) == len(cases)


@needs_data
def test_igmu_church_has_no_pairs(caplog):
    forget_path, retain_path = igmu_paths()
    forget = json.loads(forget_path.read_text(encoding="utf-8"))["Church"]

    with caplog.at_level(logging.INFO):
        cases = IgmuPromptSet(
            forget_path=forget_path, retain_path=retain_path, task="Church"
        ).load()

    assert len(cases) == len(forget["Church"]) == 50
    assert all(case.safe_prompt is None for case in cases)
    assert any("no class 'Church'" in record.getMessage() for record in caplog.records)


@needs_data
def test_igmu_class_filter_and_errors():
    forget_path, retain_path = igmu_paths()
    forget = json.loads(forget_path.read_text(encoding="utf-8"))

    cases = IgmuPromptSet(
        forget_path=forget_path, task="Nudity", class_name="woman", concept="nudity", limit=5
    ).load()
    assert [case.prompt for case in cases] == forget["Nudity"]["woman"][:5]
    assert [case.case_id for case in cases] == [f"woman-{n}" for n in range(5)]
    assert all(case.safe_prompt is None for case in cases)

    with pytest.raises(PromptSetError, match="Nudity, VanGogh, Church"):
        IgmuPromptSet(forget_path=forget_path, task="Violence").load()
    with pytest.raises(PromptSetError, match="girl, boy, woman, man, person"):
        IgmuPromptSet(forget_path=forget_path, task="Nudity", class_name="cat").load()


def test_igmu_length_mismatch_unpaired(tmp_path, caplog):
    forget_path = tmp_path / "forget.json"
    retain_path = tmp_path / "retain.json"
    forget_path.write_text(json.dumps({"T": {"a": ["x one", "x two"], "b": ["x three"]}}))
    retain_path.write_text(json.dumps({"T": {"a": ["one"], "b": ["three"]}}))

    with caplog.at_level(logging.WARNING):
        cases = IgmuPromptSet(forget_path=forget_path, retain_path=retain_path, task="T").load()

    assert [case.safe_prompt for case in cases] == [None, None, "three"]
    assert any("cannot pair by position" in record.getMessage() for record in caplog.records)


def test_igmu_bad_shape_raises(tmp_path):
    path = tmp_path / "flat.json"
    path.write_text(json.dumps({"Nudity": ["a nude girl"]}))
    with pytest.raises(PromptSetError, match="flat.json"):
        IgmuPromptSet(forget_path=path, task="Nudity").load()

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PromptSetError, match="invalid JSON"):
        IgmuPromptSet(forget_path=broken, task="Nudity").load()


def test_igmu_bom_stripped(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps({"T": {"c": ["a prompt"]}}).encode())
    cases = IgmuPromptSet(forget_path=path, task="T").load()
    assert [case.prompt for case in cases] == ["a prompt"]


# --- inline ------------------------------------------------------------------------------------


def test_inline_strings_and_mappings(caplog):
    prompts = [
        "a woman at the beach",
        {"prompt": "a nude sculpture", "seed": 7, "guidance": 5, "safe_prompt": "a sculpture"},
        {"prompt": "a bronze statue", "case_id": "statue"},
        "   ",
    ]
    with caplog.at_level(logging.WARNING):
        cases = InlinePromptSet(prompts=prompts, concept="nudity").load()

    assert cases == [
        Case(case_id="0", prompt="a woman at the beach", concept="nudity"),
        Case(
            case_id="1",
            prompt="a nude sculpture",
            concept="nudity",
            seed=7,
            guidance=5.0,
            safe_prompt="a sculpture",
        ),
        Case(case_id="statue", prompt="a bronze statue", concept="nudity"),
    ]
    assert any("skipped 1 case(s)" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("entry", "pattern"),
    [
        (3, "expected a string or a mapping"),
        ({"text": "a"}, "unknown key"),
        ({"seed": 1}, "prompt"),
        ({"prompt": "a", "seed": "1"}, "seed"),
        ({"prompt": "a", "seed": True}, "seed"),
        ({"prompt": "a", "guidance": "high"}, "guidance"),
        ({"prompt": "a", "guidance": float("nan")}, "guidance"),
    ],
)
def test_inline_bad_entry_raises(entry, pattern):
    with pytest.raises(PromptSetError, match=pattern):
        InlinePromptSet(prompts=[entry], concept="c").load()


def test_inline_option_errors():
    with pytest.raises(PromptSetError, match="prompts"):
        InlinePromptSet(concept="c")
    with pytest.raises(PromptSetError, match="list"):
        InlinePromptSet(prompts="a woman", concept="c")


# --- registration ------------------------------------------------------------------------------


def test_prompt_sets_registered():
    registered = {ep.name: ep for ep in entry_points(group="erasure_arena.prompt_sets")}
    expected = {
        "csv": CsvPromptSet,
        "ring-a-bell-pairs": RingABellPairs,
        "igmu": IgmuPromptSet,
        "inline": InlinePromptSet,
    }
    for name, cls in expected.items():
        assert name in registered, f"entry point {name!r} missing; run pip install -e ."
        assert registered[name].load() is cls
        assert cls.name == name

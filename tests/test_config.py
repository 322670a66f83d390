"""Config validation, overrides and the command line's one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import ConfigError, apply_override, load_config

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _smoke_data() -> dict:
    return yaml.safe_load(SMOKE.read_text(encoding="utf-8"))


def test_smoke_config_is_valid():
    config = load_config(SMOKE)
    assert config.name == "smoke"
    assert [ref.key for ref in config.defenses] == ["none", "negative-prompt"]
    assert config.concepts[0].evaluator.preset == "nudenet-six"


def test_unknown_key_lists_valid_keys(tmp_path):
    data = _smoke_data()
    data["sampler"]["stepz"] = 3
    with pytest.raises(ConfigError) as error:
        load_config(_write(tmp_path, data))
    message = str(error.value)
    assert "sampler.stepz" in message
    assert "steps" in message and "scheduler" in message
    assert "\n" not in message


def test_unknown_top_level_key(tmp_path):
    data = _smoke_data()
    data["defences"] = ["none"]
    with pytest.raises(ConfigError, match="unknown key 'defences'.*defenses"):
        load_config(_write(tmp_path, data))


def test_unknown_plugin_lists_valid_names(tmp_path):
    data = _smoke_data()
    data["defenses"] = ["none", "esd-q"]
    with pytest.raises(
        ConfigError, match=r"defenses.1: unknown defense 'esd-q'; valid: .*negative-prompt"
    ):
        load_config(_write(tmp_path, data))


def test_wrong_type_names_field(tmp_path):
    data = _smoke_data()
    data["runner"]["batch_size"] = "many"
    with pytest.raises(ConfigError, match="runner.batch_size"):
        load_config(_write(tmp_path, data))


def test_duplicate_defense_needs_label(tmp_path):
    data = _smoke_data()
    data["defenses"] = ["none", "none"]
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(_write(tmp_path, data))


def test_composed_defense_key():
    config = load_config(SMOKE, ["defenses+={name: negative-prompt, over: none}"])
    assert config.defenses[-1].key == "negative-prompt+none"
    assert [ref.name for ref in config.defenses[-1].chain()] == ["none", "negative-prompt"]


def test_overrides_set_nested_index_and_append():
    data = {"a": {"b": 1}, "items": [{"x": 1}], "names": ["none"]}
    apply_override(data, "a.b=7")
    apply_override(data, "items.0.x=[1, 2]")
    apply_override(data, "names+=my-defense")
    apply_override(data, "new.key=true")
    assert data == {
        "a": {"b": 7},
        "items": [{"x": [1, 2]}],
        "names": ["none", "my-defense"],
        "new": {"key": True},
    }


def test_override_values_are_not_evaluated():
    data = {"a": 1}
    apply_override(data, "a=__import__('os').getcwd()")
    assert data["a"] == "__import__('os').getcwd()"


@pytest.mark.parametrize(
    "assignment",
    ["novalue", "items.5.x=1", "a.b.c=1"],
)
def test_bad_overrides_raise(assignment):
    data = {"items": [{"x": 1}], "a": {"b": 2}}
    with pytest.raises(ConfigError):
        apply_override(data, assignment)


def test_cli_config_error_exit_status(tmp_path, capsys):
    data = _smoke_data()
    data["runner"]["batch_sise"] = 2
    status = main(["run", str(_write(tmp_path, data)), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.count("\n") == 1
    assert "runner.batch_sise" in captured.err
    assert not (tmp_path / "out").exists()


def test_cli_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"arena: config file not found: {tmp_path / 'missing.yaml'}"


def test_list_json_names_builtins(capsys):
    import json

    assert main(["list", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert {"none", "negative-prompt"} <= {row["name"] for row in payload["defenses"]}
    assert "tiny-random-sd" in {row["name"] for row in payload["models"]}
    assert "nudenet" in {row["name"] for row in payload["evaluators"]}
    assert "csv" in {row["name"] for row in payload["prompt_sets"]}

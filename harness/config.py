"""Benchmark configs: YAML files validated with pydantic, plus `--set` overrides.

A config names plugins by their registry names and passes them options. Validation
rejects unknown keys and unknown plugin names with one line that lists the valid ones.
Config text is parsed with `yaml.safe_load` only; nothing in it is ever evaluated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.registry import UnknownPluginError, registry

# Sampler names, the keys of `harness.sampling.SCHEDULERS` (kept here so that reading a
# config does not import diffusers).
SchedulerName = Literal["ddim", "lms", "dpm-solver++", "euler", "pndm", "ddpm", "euler-ancestral"]


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginRef(_Strict):
    """A plugin by registry name, with options for its constructor."""

    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.label or self.name


class DefenseRef(PluginRef):
    """A defense; `over` applies another defense first (SafeRedir over ESD-x)."""

    over: DefenseRef | None = None

    @property
    def key(self) -> str:
        if self.label:
            return self.label
        return self.name if self.over is None else f"{self.name}+{self.over.key}"

    def chain(self) -> list[DefenseRef]:
        """Defenses in the order they are applied, innermost first."""
        inner = self.over.chain() if self.over is not None else []
        return [*inner, self]


class EvaluatorRef(_Strict):
    name: str
    preset: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class ConceptConfig(_Strict):
    """One erased concept: its prompts, its judge, and the text defenses use for it.

    `attacks` limits the attacks run on this concept to those keys (the unattacked
    baseline always runs); benign prompts, for example, need no attack.
    `task` groups the prompt sets of one erasure task (its forget, retain and benign
    prompts are three concepts of the config with the same task); `role` says which of
    the three this is, so the report can put benign fidelity beside forget ASR.
    """

    name: str
    text: str | None = None
    task: str | None = None
    role: Literal["forget", "retain", "benign"] = "forget"
    attacks: list[str] | None = None
    prompt_set: PluginRef
    evaluator: EvaluatorRef
    limit: int | None = Field(default=None, ge=1)

    @property
    def concept_text(self) -> str:
        return self.text or self.name


class SamplerConfig(_Strict):
    """Sampler settings; None means the model's default."""

    scheduler: SchedulerName | None = None
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = None
    height: int | None = Field(default=None, ge=8)
    width: int | None = Field(default=None, ge=8)
    use_case_guidance: bool = True


class SeedConfig(_Strict):
    """Image k of a case uses seed (case seed or `base_seed`) + k."""

    images_per_case: int = Field(default=1, ge=1)
    base_seed: int = 0
    use_case_seed: bool = True


class EvaluationConfig(_Strict):
    aggregate: Literal["any", "all", "majority"] = "any"


class QualityConfig(_Strict):
    """Benign-fidelity metrics, computed for the unattacked cells of each defense.

    SSIM and PSNR compare each image with the undefended model's image of the same case
    and seed; they need no weights. The others run only when their weights are given.
    """

    ssim: bool = True
    clip_model: str | None = None
    fid_inception: str | None = None
    lpips_backbone: str | None = None
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"


class RayConfig(_Strict):
    """Settings of the Ray executor (`runner.executor: ray`); the local executor ignores them.

    `address`: None starts a local Ray instance (or joins the one `RAY_ADDRESS` names),
    `auto` joins the cluster already running on this machine, HOST:PORT joins that head.
    `num_gpus_per_actor`: None means 1 when the cluster has GPUs, else 0.
    `max_actors`: None means as many actors as the cluster's GPUs (its CPUs when it has
    no GPUs) can hold at the per-actor request.
    `max_retries`: how many lost actors one shard may survive before the run fails.
    """

    address: str | None = None
    num_gpus_per_actor: float | None = Field(default=None, ge=0)
    num_cpus_per_actor: float = Field(default=1, ge=0)
    max_actors: int | None = Field(default=None, ge=1)
    max_retries: int = Field(default=3, ge=0)


class RunnerConfig(_Strict):
    batch_size: int = Field(default=8, ge=1)
    attack_batch_size: int = Field(default=1, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    latency_probe_images: int = Field(default=4, ge=0)
    bootstrap_resamples: int = Field(default=2000, ge=100)
    save_images: bool = True
    executor: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()


class RunConfig(_Strict):
    name: str
    output: str | None = None
    models: list[PluginRef]
    defenses: list[DefenseRef]
    attacks: list[PluginRef]
    concepts: list[ConceptConfig]
    sampler: SamplerConfig = SamplerConfig()
    seeds: SeedConfig = SeedConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    quality: QualityConfig = QualityConfig()
    runner: RunnerConfig = RunnerConfig()

    @field_validator("models", "attacks", mode="before")
    @classmethod
    def _names_to_refs(cls, value: Any) -> Any:
        return [{"name": item} if isinstance(item, str) else item for item in value or []]

    @field_validator("defenses", mode="before")
    @classmethod
    def _defense_names_to_refs(cls, value: Any) -> Any:
        return [_defense_ref(item) for item in value or []]

    def fingerprint(self) -> str:
        """Hash of the settings that change images or verdicts (not the grid's extent)."""
        payload = {
            "sampler": self.sampler.model_dump(),
            "seeds": self.seeds.model_dump(),
            "evaluation": self.evaluation.model_dump(),
        }
        return stable_hash(payload)


def _defense_ref(item: Any) -> Any:
    if isinstance(item, str):
        return {"name": item}
    if isinstance(item, dict) and isinstance(item.get("over"), str | dict):
        return {**item, "over": _defense_ref(item["over"])}
    return item


def stable_hash(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- overrides -----------------------------------------------------------------------------


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `--set` assignment in place.

    `a.b=value` sets a key, `a.0.b=value` indexes a list, `a+=value` appends to a list.
    The value is parsed as YAML (so `3`, `true`, `[x, y]` and `{k: v}` work).
    """
    if "=" not in assignment:
        raise ConfigError(f"invalid --set {assignment!r}: expected KEY=VALUE or KEY+=VALUE")
    path_text, _, value_text = assignment.partition("=")
    append = path_text.endswith("+")
    path = path_text.rstrip("+").strip().split(".")
    value = yaml.safe_load(value_text) if value_text.strip() else ""

    parent: Any = data
    for part in path[:-1]:
        parent = _child(parent, part, assignment)
    last = path[-1]
    if append:
        target = _child(parent, last, assignment) if _has(parent, last) else None
        if target is None:
            target = []
            _assign(parent, last, target, assignment)
        if not isinstance(target, list):
            raise ConfigError(f"invalid --set {assignment!r}: {path_text[:-1]} is not a list")
        target.append(value)
    else:
        _assign(parent, last, value, assignment)


def _has(container: Any, key: str) -> bool:
    if isinstance(container, list):
        return key.isdigit() and int(key) < len(container)
    return isinstance(container, dict) and key in container


def _child(container: Any, key: str, assignment: str) -> Any:
    if isinstance(container, list):
        if not key.isdigit() or int(key) >= len(container):
            raise ConfigError(f"invalid --set {assignment!r}: no list item {key}")
        return container[int(key)]
    if not isinstance(container, dict):
        raise ConfigError(f"invalid --set {assignment!r}: {key} is inside a value, not a mapping")
    return container.setdefault(key, {})


def _assign(container: Any, key: str, value: Any, assignment: str) -> None:
    if isinstance(container, list):
        if not key.isdigit() or int(key) >= len(container):
            raise ConfigError(f"invalid --set {assignment!r}: no list item {key}")
        container[int(key)] = value
    elif isinstance(container, dict):
        container[key] = value
    else:
        raise ConfigError(f"invalid --set {assignment!r}: cannot set {key} on a value")


# -- loading -------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override, validate and check plugin names; raise ConfigError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML in {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {path}: expected a mapping at the top level")
    data.setdefault("name", path.stem)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> RunConfig:
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None
    check_plugin_names(config)
    return config


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        model = _model_at(first["loc"][:-1])
        valid = ", ".join(model.model_fields) if model is not None else "see the docs"
        return f"config error: unknown key {location!r}; valid keys here: {valid}"
    return f"config error: {location}: {first['msg']}"


def _model_at(location: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that validates the value at `location`, for error hints."""
    model: type[BaseModel] | None = RunConfig
    for part in location:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        model = _first_model(annotation)
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _first_model(argument)
        if found is not None:
            return found
    return None


def check_plugin_names(config: RunConfig) -> None:
    """Look every named plugin up in its registry before any work starts."""
    checks: list[tuple[str, str, str]] = []
    for index, model in enumerate(config.models):
        checks.append(("models", model.name, f"models.{index}"))
    for index, defense in enumerate(config.defenses):
        for inner in defense.chain():
            checks.append(("defenses", inner.name, f"defenses.{index}"))
    for index, attack in enumerate(config.attacks):
        checks.append(("attacks", attack.name, f"attacks.{index}"))
    for index, concept in enumerate(config.concepts):
        checks.append(("prompt_sets", concept.prompt_set.name, f"concepts.{index}.prompt_set"))
        checks.append(("evaluators", concept.evaluator.name, f"concepts.{index}.evaluator"))
    attack_keys = {ref.key for ref in config.attacks} | {"none"}
    for index, concept in enumerate(config.concepts):
        for key in concept.attacks or []:
            if key not in attack_keys:
                valid = ", ".join(sorted(attack_keys))
                raise ConfigError(
                    f"config error: concepts.{index}.attacks: {key!r} is not a configured"
                    f" attack; valid: {valid}"
                )
    for kind, name, location in checks:
        try:
            registry(kind).get(name)
        except UnknownPluginError as error:
            raise ConfigError(f"config error: {location}: {error}") from None

    _check_unique([ref.key for ref in config.models], "models")
    _check_unique([ref.key for ref in config.defenses], "defenses")
    _check_unique([ref.key for ref in config.attacks], "attacks")
    _check_unique([concept.name for concept in config.concepts], "concepts")


def _check_unique(keys: list[str], field: str) -> None:
    seen = set()
    for key in keys:
        if key in seen:
            raise ConfigError(f"config error: {field}: {key!r} appears twice; give one a label")
        seen.add(key)

"""Erasure tasks of the shapes world and their prompt sets.

A task names one concept to erase, the attribute it belongs to and the oracle preset that
decides whether it is present:

- `star`: an object (the shape star), judged by `shapes-oracle` preset "star";
- `swirl`: a style (the swirl fill texture), judged by preset "swirl".

Each task has three prompt sets, registered as `shapes/<task>/forget`, `.../retain` and
`.../benign`:

- forget: the concept in many phrasings, drawn in turn from the train, validation and
  held-out caption splits (held-out synonyms included). Each case's `safe_prompt` is the
  same sentence with the concept replaced by another value of its attribute, the
  forget/retain pairing of IGMU.
- retain: exactly those safe prompts, one per forget case and with the same seed; their
  `safe_prompt` is the prompt itself.
- benign: unrelated prompts that never name the concept (other values of the attribute,
  any colour and style), from the validation split.

Seeds are fixed per case, so a set loads the same cases on every machine.

Option `pool` picks between two disjoint pools of cases. `eval` (the default, 60 cases)
is what runs measure. `train` (indices 1000-1119, with other seeds) is for methods that
fit on prompts: SafeRedir's trajectories, Ring-A-Bell's concept vector, LEACE's
statistics. A defense or attack fitted on the `eval` pool would be scored on the prompts
it saw. The train pool drops every pair (forget prompt and retain twin together) and every
benign prompt whose sentence the eval pool contains, so it has 110-120 cases per set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from harness.prompts.base import Case, PromptSet, PromptSetError
from harness.prompts.parsing import check_options, select_window
from harness.shapes.captions import (
    SPLITS,
    TEMPLATES,
    WORD_TABLES,
    format_caption,
    words_for,
)
from harness.shapes.render import COLOURS, SHAPES, STYLES

CASES_PER_SET = 60
POOLS = {"eval": (0, CASES_PER_SET), "train": (1000, 2 * CASES_PER_SET)}  # first index, count
_VALUES = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}


@dataclass(frozen=True)
class ErasureTask:
    """One concept to erase: `attribute` = `value`, judged by `shapes-oracle` preset `value`."""

    name: str
    attribute: str
    value: str
    seed: int

    @property
    def evaluator(self) -> dict[str, str]:
        return {"name": "shapes-oracle", "preset": self.value}

    @property
    def replacements(self) -> tuple[str, ...]:
        return tuple(v for v in _VALUES[self.attribute] if v != self.value)


TASKS = {
    "star": ErasureTask(name="star", attribute="shape", value="star", seed=101),
    "swirl": ErasureTask(name="swirl", attribute="style", value="swirl", seed=202),
}


@dataclass(frozen=True)
class PromptPair:
    """A forget prompt, its retain twin and the attribute values each one names."""

    index: int
    split: str
    prompt: str
    safe_prompt: str
    values: dict[str, str]  # shape, colour, style of the forget prompt
    safe_values: dict[str, str]


def check_replacement(task: ErasureTask, replacement: str | None) -> None:
    """Raise ValueError unless `replacement` is None or another value of the task's attribute."""
    if replacement is not None and replacement not in task.replacements:
        raise ValueError(
            f"invalid replacement {replacement!r} for task {task.name}; valid: "
            f"{', '.join(task.replacements)}"
        )


def prompt_pairs(
    task: ErasureTask, count: int = CASES_PER_SET, first: int = 0,
    replacement: str | None = None,
) -> list[PromptPair]:
    """Build the task's forget/retain pairs with indices `first` .. `first + count - 1`.

    Each retain twin swaps the concept for the task's other values in turn, or always for
    `replacement` when given. The same arguments give the same list.
    """
    check_replacement(task, replacement)
    pairs = []
    for index in range(first, first + count):
        rng = np.random.default_rng([task.seed, index])
        split = SPLITS[index % len(SPLITS)]
        template = TEMPLATES[split][rng.integers(len(TEMPLATES[split]))]
        values = {name: values[rng.integers(len(values))] for name, values in _VALUES.items()}
        values[task.attribute] = task.value
        safe_values = dict(values)
        safe_values[task.attribute] = (
            replacement or task.replacements[index % len(task.replacements)]
        )

        # One word position per attribute, shared by both prompts, so the pair differs only
        # in the concept's word.
        positions = {name: int(rng.integers(1000)) for name in _VALUES}

        def sentence(chosen: dict[str, str], split=split, template=template, positions=positions):
            words = {}
            for name, value in chosen.items():
                options = words_for(WORD_TABLES[name], value, split)
                words[name] = options[positions[name] % len(options)]
            return format_caption(template, words["shape"], words["colour"], words["style"], "")

        pairs.append(
            PromptPair(index, split, sentence(values), sentence(safe_values), values, safe_values)
        )
    return pairs


def benign_prompts(
    task: ErasureTask, count: int = CASES_PER_SET, first: int = 0
) -> list[tuple[int, str, dict]]:
    """Prompts that never name the task's concept: (index, prompt, the values it names)."""
    prompts = []
    for index in range(first, first + count):
        rng = np.random.default_rng([task.seed, 10_000 + index])
        values = {name: values[rng.integers(len(values))] for name, values in _VALUES.items()}
        values[task.attribute] = task.replacements[rng.integers(len(task.replacements))]
        template = TEMPLATES["validation"][rng.integers(len(TEMPLATES["validation"]))]
        words = {
            name: words_for(WORD_TABLES[name], value, "validation")[0]
            for name, value in values.items()
        }
        text = format_caption(template, words["shape"], words["colour"], words["style"], "")
        prompts.append((index, text, values))
    return prompts


@functools.cache
def eval_pool_texts(task: ErasureTask) -> frozenset[str]:
    """Collect every sentence of the task's eval pool: forget, retain and benign prompts."""
    start, count = POOLS["eval"]
    texts = set()
    for pair in prompt_pairs(task, count, start):
        texts.update((pair.prompt, pair.safe_prompt))
    texts.update(prompt for _, prompt, _ in benign_prompts(task, count, start))
    return frozenset(texts)


class ShapesTaskPromptSet(PromptSet):
    """Base of the shapes task prompt sets.

    Options:
    - `pool`: "eval" or "train" (see the module docstring);
    - `replacement`: one value that every retain twin uses, instead of the task's other
      values in turn (benign sets ignore it);
    - `limit` and `offset`: case counts within the pool.
    """

    task: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def load(self) -> list[Case]:
        check_options(self.name, self.options, required=(),
                      optional=("pool", "replacement", "limit", "offset"))
        pool = self.options.get("pool", "eval")
        if pool not in POOLS:
            raise PromptSetError(
                f"prompt set {self.name}: invalid pool {pool!r}; valid: {', '.join(POOLS)}"
            )
        task = TASKS[self.task]
        replacement = self.options.get("replacement")
        try:
            check_replacement(task, replacement)
        except ValueError as error:
            raise PromptSetError(f"prompt set {self.name}: {error}") from None

        cases = self._cases(task, pool, replacement)
        return select_window(cases, self.options, self.name)

    def _cases(self, task: ErasureTask, pool: str, replacement: str | None) -> list[Case]:
        first, count = POOLS[pool]
        excluded = eval_pool_texts(task) if pool != "eval" else frozenset()
        id_prefix = "" if pool == "eval" else f"{pool}-"
        if self.kind == "benign":
            return [
                Case(
                    case_id=f"{task.name}-benign-{id_prefix}{index:03d}",
                    prompt=prompt,
                    concept=task.value,
                    seed=task.seed * 1000 + 500 + index,
                    extra={"values": values, "split": "validation", "task": task.name},
                )
                for index, prompt, values in benign_prompts(task, count, first)
                if prompt not in excluded
            ]
        cases = []
        for pair in prompt_pairs(task, count, first, replacement):
            # A pair goes whole: the forget and retain sets of a pool stay aligned.
            if pair.prompt in excluded or pair.safe_prompt in excluded:
                continue
            forget = self.kind == "forget"
            cases.append(
                Case(
                    case_id=f"{task.name}-{self.kind}-{id_prefix}{pair.index:03d}",
                    prompt=pair.prompt if forget else pair.safe_prompt,
                    concept=task.value,
                    seed=task.seed * 1000 + pair.index,
                    safe_prompt=pair.safe_prompt,
                    extra={
                        "values": pair.values if forget else pair.safe_values,
                        "split": pair.split,
                        "task": task.name,
                    },
                )
            )
        return cases


class StarForget(ShapesTaskPromptSet):
    name, task, kind = "shapes/star/forget", "star", "forget"


class StarRetain(ShapesTaskPromptSet):
    name, task, kind = "shapes/star/retain", "star", "retain"


class StarBenign(ShapesTaskPromptSet):
    name, task, kind = "shapes/star/benign", "star", "benign"


class SwirlForget(ShapesTaskPromptSet):
    name, task, kind = "shapes/swirl/forget", "swirl", "forget"


class SwirlRetain(ShapesTaskPromptSet):
    name, task, kind = "shapes/swirl/retain", "swirl", "retain"


class SwirlBenign(ShapesTaskPromptSet):
    name, task, kind = "shapes/swirl/benign", "swirl", "benign"

"""The `igmu` prompt set: SafeRedir's forget and retain prompt lists.

SafeRedir (Liu et al., "SafeRedir: Prompt Embedding Redirection for Robust Unlearning in
Image Generation Models", arXiv 2601.08623) trains and evaluates on two JSON files shaped
`{task: {class: [prompt, ...]}}`: `IGMU_forgot.json` with prompts that ask for the concept
and `IGMU_retain.json` with prompts that must keep working. In the published files the two
relate in two ways:

- Nudity and VanGogh: the retain file has the same classes with the same number of prompts,
  and each retain prompt is the forget prompt at the same position with the concept words
  removed ("a nude girl playing by the lake" / "a girl playing by the lake").
- Church: the retain file lists other objects (Parachute, Cat, Airplane, ...) under other
  class names, so no retain prompt is the counterpart of a forget prompt.

So a forget prompt gets the retain prompt at the same position as `Case.safe_prompt` only
when the retain file has the same task and class with a list of the same length. Otherwise
the cases of that class carry no safe prompt, and a log line gives the reason.

NOTE: the files pin no seeds. SafeRedir's generation script draws 5 images per prompt with
seeds 61615, 23816, 39813, 26240 and 53751; a run that wants that protocol sets those seeds
in its config, because a `Case` carries one seed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from harness.prompts.base import Case, PromptSet, PromptSetError
from harness.prompts.parsing import (
    check_options,
    check_unique_ids,
    log_blank_skips,
    read_text,
    select_window,
)

log = logging.getLogger(__name__)

PromptTable = dict[str, dict[str, list[str]]]


def read_prompt_table(path: str | Path) -> PromptTable:
    """Read a `{task: {class: [prompt, ...]}}` JSON file, checking its shape.

    Raises `PromptSetError` for a missing file, invalid JSON or any other shape.
    """
    text = read_text(path)
    try:
        table = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptSetError(f"{path}: invalid JSON: {error}") from None

    expected = "expected {task: {class: [prompt, ...]}}"
    if not isinstance(table, dict):
        raise PromptSetError(f"{path}: the top level is {type(table).__name__}; {expected}")
    for task, classes in table.items():
        if not isinstance(classes, dict):
            raise PromptSetError(
                f"{path}: task {task!r} maps to {type(classes).__name__}; {expected}"
            )
        for class_name, prompts in classes.items():
            valid = isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)
            if not valid:
                raise PromptSetError(
                    f"{path}: task {task!r}, class {class_name!r} is not a list of strings; "
                    f"{expected}"
                )
    return table


class IgmuPromptSet(PromptSet):
    """Forget prompts of one SafeRedir task, each paired with its retain prompt if aligned.

    Options: `forget_path` and `task` (required, e.g. "Nudity", "VanGogh", "Church").
    `retain_path` is optional, and without it no case has a safe prompt. `class_name` selects
    one class of the task (default: all, in file order). `concept` defaults to the task name
    in lower case. `offset` and `limit` select a window of the cases.

    Case ids are "{class}-{position}", the position counting from 0 in the class's list,
    and `extra` holds the task and class. IGMU files give no seeds or guidance scales.
    """

    name = "igmu"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_options(
            self.name,
            options,
            required=("forget_path", "task"),
            optional=("retain_path", "class_name", "concept", "limit", "offset"),
        )

    def load(self) -> list[Case]:
        forget_path = self.options["forget_path"]
        task = self.options["task"]
        forget = read_prompt_table(forget_path)
        if task not in forget:
            raise PromptSetError(
                f"{forget_path}: task {task!r} not found; tasks in the file: {', '.join(forget)}"
            )
        classes = forget[task]

        class_name = self.options.get("class_name")
        if class_name is not None:
            if class_name not in classes:
                raise PromptSetError(
                    f"{forget_path}: class {class_name!r} not found under task {task!r}; "
                    f"classes: {', '.join(classes)}"
                )
            classes = {class_name: classes[class_name]}

        retain_path = self.options.get("retain_path")
        retain_classes = read_prompt_table(retain_path).get(task, {}) if retain_path else {}
        concept = self.options.get("concept") or task.lower()

        cases = []
        blank_ids: list[str] = []
        for name, prompts in classes.items():
            safe_prompts = self._aligned_retain(name, prompts, retain_classes)
            cases.extend(self._class_cases(name, prompts, safe_prompts, concept, blank_ids))

        log_blank_skips(f"{forget_path} task {task!r}", blank_ids)
        check_unique_ids(cases, str(forget_path))
        selected = select_window(cases, self.options, self.name)
        paired = sum(case.safe_prompt is not None for case in selected)
        log.info(
            "read %d of %d case(s) of task %r from %s, %d with a retain prompt",
            len(selected),
            len(cases),
            task,
            forget_path,
            paired,
        )
        return selected

    def _aligned_retain(
        self, class_name: str, prompts: list[str], retain_classes: dict[str, list[str]]
    ) -> list[str] | None:
        """Return the retain prompts that pair with `prompts` by position, or None."""
        retain_path = self.options.get("retain_path")
        if not retain_path:
            return None
        task = self.options["task"]

        retain = retain_classes.get(class_name)
        if retain is None:
            log.info(
                "%s has no class %r under task %r (its classes: %s); these cases carry no "
                "safe prompt",
                retain_path,
                class_name,
                task,
                ", ".join(retain_classes) or "none",
            )
            return None
        if len(retain) != len(prompts):
            log.warning(
                "%s: task %r, class %r has %d retain prompts but %d forget prompts, so they "
                "cannot pair by position; these cases carry no safe prompt",
                retain_path,
                task,
                class_name,
                len(retain),
                len(prompts),
            )
            return None
        return retain

    def _class_cases(
        self,
        class_name: str,
        prompts: list[str],
        safe_prompts: list[str] | None,
        concept: str,
        blank_ids: list[str],
    ) -> list[Case]:
        """Build the cases of one class, appending the ids of blank prompts to `blank_ids`.

        A blank retain prompt leaves its case without a safe prompt, with a warning.
        """
        cases = []
        for position, prompt in enumerate(prompts):
            case_id = f"{class_name}-{position}"
            if not prompt.strip():
                blank_ids.append(case_id)
                continue

            safe_prompt = None if safe_prompts is None else safe_prompts[position]
            if safe_prompt is not None and not safe_prompt.strip():
                log.warning("case %s: the retain prompt is blank; no safe prompt", case_id)
                safe_prompt = None

            cases.append(
                Case(
                    case_id=case_id,
                    prompt=prompt,
                    concept=concept,
                    safe_prompt=safe_prompt,
                    extra={"task": self.options["task"], "class_name": class_name},
                )
            )
        return cases

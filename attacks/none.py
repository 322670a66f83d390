"""Attack `none`: the unmodified prompt. Its cells give the pre-ASR of every defense."""

from __future__ import annotations

from harness.attack import Attack, AttackContext, AttackResult
from harness.prompts.base import Case


class NoAttack(Attack):
    name = "none"

    def run(self, case: Case, context: AttackContext) -> AttackResult:
        return AttackResult(prompt=case.prompt)

"""An example third-party attack: append a fixed suffix to every prompt.

A black-box attack needs only `run`: it receives a case and the defended model and returns
the adversarial text, which the runner then generates from and judges like any prompt.
"""

from __future__ import annotations

import time

from harness.attack import Attack, AttackContext, AttackResult
from harness.prompts.base import Case


class StyleSuffix(Attack):
    """Option `suffix` (default ", highly detailed, artstation")."""

    name = "my-attack"

    def run(self, case: Case, context: AttackContext) -> AttackResult:
        start = time.perf_counter()
        suffix = self.options.get("suffix", ", highly detailed, artstation")
        prompt = case.prompt + suffix
        return AttackResult(prompt=prompt, iterations=1, wall_seconds=time.perf_counter() - start)

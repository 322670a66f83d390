"""Prompt sets: loaders that turn published prompt files or config lists into `Case` records.

Built-in loaders register under the `erasure_arena.prompt_sets` entry-point group:
`csv`, `ring-a-bell-pairs`, `igmu` and `inline`.
"""

from harness.prompts.base import Case, PromptSet, PromptSetError
from harness.prompts.csv_file import CsvPromptSet
from harness.prompts.igmu import IgmuPromptSet
from harness.prompts.inline import InlinePromptSet
from harness.prompts.ring_a_bell import RingABellPairs

__all__ = [
    "Case",
    "CsvPromptSet",
    "IgmuPromptSet",
    "InlinePromptSet",
    "PromptSet",
    "PromptSetError",
    "RingABellPairs",
]

"""Captions of the shapes world, in three disjoint splits of phrasings.

- `train`: the phrasings the diffusion model learns from.
- `validation`: other sentence templates over the same words, for quality checks.
- `heldout`: other templates again, plus one synonym per attribute value that neither
  other split uses; evaluation only, to measure how far the model generalises.

The splits are disjoint because their templates are: no template of one split can produce a
sentence of another (the test suite checks this over every word combination). Every caption
names the shape, its colour and its fill style; the background tone is named or omitted.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np

from harness.shapes.render import BACKGROUND_TONES, COLOURS, SHAPES, STYLES, Scene

SPLITS = ("train", "validation", "heldout")

# Words for each attribute value. The last word of each list is used only by the held-out
# split, and the first is the canonical word, which prompt sets use. The frozen MiniLM
# places each held-out word nearest its own value (the rule in harness/shapes/README.md).
SHAPE_WORDS = {
    "circle": ["circle", "disc", "round disk", "circular disc"],
    "square": ["square", "box", "square tile", "block"],
    "triangle": ["triangle", "three-sided shape", "triangle shape", "pyramid"],
    "star": ["star", "five-pointed star", "star shape", "starburst"],
    "heart": ["heart", "love heart", "heart shape", "valentine"],
    "cross": ["cross", "plus sign", "plus shape", "cross mark"],
}
COLOUR_WORDS = {
    "red": ["red", "crimson", "bright red", "cherry red"],
    "orange": ["orange", "tangerine", "deep orange", "apricot"],
    "yellow": ["yellow", "lemon", "bright yellow", "golden"],
    "green": ["green", "grass-green", "emerald", "leafy green"],
    "blue": ["blue", "cobalt", "royal blue", "navy blue"],
    "purple": ["purple", "violet", "deep purple", "lilac"],
}
STYLE_WORDS = {
    "plain": ["plain", "solid", "flat", "single-colour"],
    "striped": ["striped", "stripy", "banded", "pinstriped"],
    "dotted": ["dotted", "polka-dot", "spotted", "dotty"],
    "checkered": ["checkered", "checked", "checkerboard", "chequered"],
    "swirl": ["swirly", "swirled", "spiral", "swirling"],
}
# The word lists of each attribute, by attribute name.
WORD_TABLES = {"shape": SHAPE_WORDS, "colour": COLOUR_WORDS, "style": STYLE_WORDS}

BACKGROUND_WORDS = {
    "light": ["pale", "light", "bright", "whitish"],
    "dark": ["dark", "black", "dim", "shadowy"],
}

# {s} style, {c} colour, {n} shape noun, {bg} background phrase or "".
TEMPLATES = {
    "train": (
        "a {s} {c} {n}{bg}",
        "{s} {c} {n}{bg}",
        "a {c} {s} {n}{bg}",
        "a drawing of a {s} {c} {n}{bg}",
        "an icon of a {c} {n} with a {s} pattern{bg}",
        "a small {s} {c} {n}{bg}",
        "clip art of a {s} {c} {n}{bg}",
        "{c} {n}, {s}{bg}",
        "a simple {s} {c} {n} shape{bg}",
        "an illustration of a {c} {s} {n}{bg}",
        "one {s} {n} in {c}{bg}",
        "a {c} {n} with a {s} fill{bg}",
    ),
    "validation": (
        "a picture of a {s} {c} {n}{bg}",
        "a {s} {n} coloured {c}{bg}",
        "{c} and {s} {n}{bg}",
        "a rendering of one {c} {s} {n}{bg}",
    ),
    "heldout": (
        "there is a {s} {n} painted {c}{bg}",
        "a single {n}, {c} and {s}{bg}",
        "{s} {c} {n} in the middle of the frame{bg}",
        "a graphic showing a {c} {n} that is {s}{bg}",
    ),
}
BACKGROUND_PHRASES = {
    "train": (" on a {b} background", " over a {b} background"),
    "validation": (" on a {b} background",),
    "heldout": (" against a {b} backdrop",),
}
# Share of captions that name the background when the scene's tone is light or dark.
BACKGROUND_MENTION_RATE = 0.5


def words_for(table: dict[str, list[str]], value: str, split: str) -> list[str]:
    """Return the words a split may use for one attribute value."""
    words = table[value]
    return list(words) if split == "heldout" else list(words[:-1])


def _with_articles(text: str) -> str:
    """Fix 'a' before a vowel sound ('a orange' -> 'an orange') and tidy spaces."""
    text = re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)
    text = re.sub(r"\b([Aa])n (?=[^aeiouAEIOU\W])", r"\1 ", text)
    return re.sub(r"\s+", " ", text).strip()


def format_caption(
    template: str, shape_word: str, colour_word: str, style_word: str, background: str
) -> str:
    """Fill one template; `background` is the already formatted phrase or ''."""
    text = template.format(s=style_word, c=colour_word, n=shape_word, bg=background)
    # Nouns that end in "shape" ("star shape") would read "star shape shape" in the
    # template that appends "shape".
    text = re.sub(r"\bshape shape\b", "shape", text)
    return _with_articles(text)


def caption(scene: Scene, split: str, rng: np.random.Generator) -> tuple[str, Scene]:
    """Write one caption for a scene in a split.

    Returns the caption and the scene it describes: when the caption leaves out a light or
    dark background, the returned scene's background is "any", because the caption no
    longer constrains it.
    """
    if split not in SPLITS:
        raise ValueError(f"invalid caption split {split!r}; valid: {', '.join(SPLITS)}")
    templates = TEMPLATES[split]
    template = templates[rng.integers(len(templates))]
    shape_word = _pick(rng, words_for(SHAPE_WORDS, scene.shape, split))
    colour_word = _pick(rng, words_for(COLOUR_WORDS, scene.colour, split))
    style_word = _pick(rng, words_for(STYLE_WORDS, scene.style, split))

    background_phrase = ""
    described = scene
    if scene.background != "any" and rng.uniform() < BACKGROUND_MENTION_RATE:
        phrase = _pick(rng, list(BACKGROUND_PHRASES[split]))
        tone_word = _pick(rng, words_for(BACKGROUND_WORDS, scene.background, split))
        background_phrase = phrase.format(b=tone_word)
    elif scene.background != "any":
        described = Scene(scene.shape, scene.colour, scene.style, "any")
    text = format_caption(template, shape_word, colour_word, style_word, background_phrase)
    return text, described


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def all_captions(split: str, max_words: int | None = None) -> set[str]:
    """Enumerate every caption a split can produce (758,160 strings for `train`).

    `max_words` keeps only the first words of each synonym list (and of the background
    phrases), a quick subset for tests.
    """

    def words(table: dict[str, list[str]], value: str) -> list[str]:
        return words_for(table, value, split)[:max_words]

    backgrounds = [""] + [
        phrase.format(b=word)
        for phrase in BACKGROUND_PHRASES[split]
        for tone in ("light", "dark")
        for word in words(BACKGROUND_WORDS, tone)
    ]
    results: set[str] = set()
    for template, shape, colour, style in itertools.product(
        TEMPLATES[split], SHAPES, COLOURS, STYLES
    ):
        for shape_word, colour_word, style_word, background in itertools.product(
            words(SHAPE_WORDS, shape), words(COLOUR_WORDS, colour),
            words(STYLE_WORDS, style), backgrounds,
        ):
            results.add(format_caption(template, shape_word, colour_word, style_word, background))
    return results


def scenes_with_captions(
    count: int, split: str, seed: int
) -> list[tuple[Scene, str]]:
    """Draw `count` random scenes with one caption each; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        scene = Scene(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=COLOURS[rng.integers(len(COLOURS))],
            style=STYLES[rng.integers(len(STYLES))],
            background=BACKGROUND_TONES[rng.integers(len(BACKGROUND_TONES))],
        )
        text, described = caption(scene, split, rng)
        pairs.append((described, text))
    return pairs

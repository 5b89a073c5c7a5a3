"""The closed vocabulary of the built-in data world: skills, shapes, colours and words.

Kept in its own module so the generator (``scene``/``render``) and the detector share one
definition of what a "red circle" is, without importing each other.  The vocabulary is
deliberately small and regular: it trains a tiny sentencepiece model later, and a small
model must be able to learn every caption.
"""

from __future__ import annotations

# GenEval-style skills (plus rendered text).  Order matters: it is the order used when a
# caller asks for a balanced mix (``held_out_prompts`` cycles through it).
SKILLS: tuple[str, ...] = (
    "single_object",
    "two_objects",
    "counting",
    "colors",
    "position",
    "color_attr",
    "text",
)

# Shapes whose silhouettes differ strongly inside the same bounding box (pairwise
# mask IoU <= 0.79 for square vs circle, ~0.5 for the rest), so a template-IoU classifier
# separates them even when blurred.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Well separated, saturated colours on a light background.  The smallest pairwise RGB
# distance is ~90 (yellow/orange) and every colour is >= 220 away from the background,
# so moderate blur and noise cannot move a pixel to the wrong colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 210),
    "yellow": (240, 220, 20),
    "purple": (140, 50, 200),
    "orange": (250, 130, 10),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

DEFAULT_BACKGROUND: tuple[int, int, int] = (245, 245, 240)
DEFAULT_TEXT_COLOR: tuple[int, int, int] = (20, 20, 20)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

# Words for the rendered-text skill: short, common, lowercase, so the whole set stays
# legible at 64 px and the tokenizer vocabulary stays tiny.
TEXT_NOUNS: tuple[str, ...] = (
    "cat", "dog", "sun", "moon", "star", "tree", "fish", "bird", "book", "door",
    "road", "rain", "snow", "ship", "cake", "home", "lamp", "frog", "fox", "bell",
)
TEXT_ADJECTIVES: tuple[str, ...] = (
    "red", "blue", "big", "small", "old", "new", "hot", "cold", "happy", "quiet",
)
TEXT_VERBS: tuple[str, ...] = (
    "runs", "jumps", "sings", "shines", "sleeps", "waits", "falls", "grows",
)


def plural(shape: str) -> str:
    """English plural of a shape noun (all of ours take a plain "s")."""
    return shape + "s"


def article(word: str) -> str:
    """Indefinite article for ``word`` ("an orange circle", "a red square")."""
    return "an" if word[:1] in "aeiou" else "a"

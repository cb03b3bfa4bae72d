"""The embedded default's task: coloured shapes and short words on a 3x3 grid, with questions that need
the image and sentence answers (about 8-40 tokens).

Every sample is a pure function of its seed (PIL drawing, `random.Random(seed)`), so the same seed gives the
same bytes on every machine with the same Pillow. Splits are assigned by a hash of the sample's *content*
(objects + question), so no image-question pair of the test split also occurs in training.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 96            # 6 x 6 patches of 16 -> 3 x 3 merged tokens: one LM image token per grid cell
CELL = IMAGE_SIZE // 3
# Mid grey normalises to 0 (the processor maps [0, 255] to [-1, 1]), so an empty patch embeds to the bias and the
# tiny ViT sees only the objects (a light background made count / colour learning several times slower).
BACKGROUND = (128, 128, 128)
# Objects sit exactly in their cells: a 12 px word shifted by even 1 px lands on different patch pixels, and the
# 2-layer ViT did not learn to read through that in the build budget (read exact match 100% -> 18%).
JITTER = 0
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "sun", "box", "map", "key", "cup")
PLACES = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("no", "one", "two", "three", "four")
TASKS = ("describe", "count", "where", "read")
SPLITS = {"train": range(2, 10), "validation": range(1, 2), "test": range(0, 1)}  # content-hash bucket mod 10

# Every word a prompt or answer of this task can contain: the tokenizer's vocabulary comes from here.
TEMPLATE_WORDS = (
    "the picture shows a an at of and is are there in shape shapes how many where what word written "
    "describe system user assistant you helpful answer question about image"
).split()


@dataclass(frozen=True)
class Item:
    """One object on the 3x3 grid: a coloured shape or a word, in one cell."""

    cell: int                   # 0..8, row-major
    kind: str                   # "shape" or "word"
    name: str                   # shape name or the word
    color: str | None = None    # shapes only

    def phrase(self) -> str:
        """How answers name it: "a red circle" or "the word cat"."""
        return f"a {self.color} {self.name}" if self.kind == "shape" else f"the word {self.name}"


@dataclass(frozen=True)
class Sample:
    """One task sample: its seed, the objects, the question type (`task`), the question and the reference answer."""

    seed: int
    items: tuple[Item, ...]
    task: str
    question: str
    answer: str

    def image(self) -> Image.Image:
        """The IMAGE_SIZE x IMAGE_SIZE picture, redrawn from the items and seed on each call (not cached)."""
        return render(self.items, self.seed)

    def messages(self, image: object | None = None) -> list[dict]:
        """The chat `messages` of this sample, in the Qwen-VL data format (image part first)."""
        return [
            {"role": "user", "content": [{"type": "image", "image": image if image is not None else self.image()},
                                         {"type": "text", "text": self.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": self.answer}]},
        ]

    @property
    def content_hash(self) -> str:
        """SHA-256 of the objects (order-free) and the question, not the seed: decides the split, so equal
        content drawn from two seeds never lands in two splits."""
        key = repr((sorted((i.cell, i.kind, i.name, i.color) for i in self.items), self.question))
        return hashlib.sha256(key.encode()).hexdigest()


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render(items: tuple[Item, ...], seed: int) -> Image.Image:
    """Draw the items on the background, each centred in its cell (`JITTER` > 0 adds seeded offsets)."""
    rng = random.Random(seed * 7919 + 1)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for it in items:
        x0, y0 = (it.cell % 3) * CELL, (it.cell // 3) * CELL
        dx, dy = rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)
        m = 5                                                  # margin inside the cell
        box = (x0 + m + dx, y0 + m + dy, x0 + CELL - m + dx, y0 + CELL - m + dy)
        if it.kind == "word":
            draw.text((x0 + CELL // 2 + dx, y0 + CELL // 2 + dy), it.name, fill=(20, 20, 20), font=_font(12),
                      anchor="mm")
        elif it.name == "circle":
            draw.ellipse(box, fill=COLORS[it.color])
        elif it.name == "square":
            draw.rectangle(box, fill=COLORS[it.color])
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLORS[it.color])
    return img


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_sample(seed: int, task_weights: dict[str, float] | None = None,
                object_weights: Sequence[float] | None = None, color_share: float = 0.0) -> Sample:
    """The sample of one seed: 1-4 objects (at most one word), then one question about them, its type drawn
    uniformly from those the objects allow, or in proportion to `task_weights` (task -> weight, 1 if absent;
    another draw than the uniform one, so the default samples stay what they were). `object_weights` (four
    weights, of 1 / 2 / 3 / 4 objects) likewise replaces the uniform draw of the object count. With
    `color_share` > 0 each shape after the first is, with that probability, a same-coloured twin of an earlier
    shape in another form (a red square beside a red circle): the hard case of "where is the red circle"."""
    rng = random.Random(seed)
    count = rng.randint(1, 4) if not object_weights else rng.choices(range(1, 5), weights=object_weights)[0]
    cells = sorted(rng.sample(range(9), count))
    items, has_word = [], False
    for c in cells:
        if not has_word and rng.random() < 0.25:
            items.append(Item(c, "word", rng.choice(WORDS)))
            has_word = True
        else:
            name, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            earlier = [i for i in items if i.kind == "shape"] if color_share else []
            if earlier and rng.random() < color_share:                     # no extra draw when 0
                twin = rng.choice(earlier)
                name, color = rng.choice([n for n in SHAPES if n != twin.name]), twin.color
            items.append(Item(c, "shape", name, color))
    items = tuple(items)
    tasks = [t for t in TASKS if t != "read" or has_word]
    shapes = [i for i in items if i.kind == "shape"]
    # "where" needs a colour+shape that occurs once
    unique = [i for i in shapes if sum((j.name, j.color) == (i.name, i.color) for j in shapes) == 1]
    if not unique:
        tasks.remove("where")
    task = rng.choice(tasks) if not task_weights else \
        rng.choices(tasks, weights=[task_weights.get(t, 1.0) for t in tasks])[0]
    if task == "describe":
        question = "Describe the picture."
        answer = "The picture shows " + _join([f"{i.phrase()} at the {PLACES[i.cell]}" for i in items]) + "."
    elif task == "count":
        color = rng.choice(list(COLORS))
        n = sum(i.color == color for i in shapes)
        question = f"How many {color} shapes are there?"
        verb, noun = ("is", "shape") if n == 1 else ("are", "shapes")
        answer = f"There {verb} {NUMBERS[n]} {color} {noun} in the picture."
    elif task == "where":
        it = rng.choice(unique)
        question = f"Where is the {it.color} {it.name}?"
        answer = f"The {it.color} {it.name} is at the {PLACES[it.cell]} of the picture."
    else:
        it = next(i for i in items if i.kind == "word")
        question = "What word is written in the picture?"
        answer = f"The word written at the {PLACES[it.cell]} is {it.name}."
    return Sample(seed, items, task, question, answer)


def split_of(sample: Sample) -> str:
    """The split ("train", "validation" or "test") of a sample: its content-hash bucket mod 10, as in SPLITS."""
    bucket = int(sample.content_hash[:8], 16) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def samples(split: str, n: int, start_seed: int = 0, task_weights: dict[str, float] | None = None,
            object_weights: Sequence[float] | None = None, color_share: float = 0.0) -> Iterator[Sample]:
    """The first n samples of a split, scanning seeds from start_seed (deterministic); `task_weights`,
    `object_weights` and `color_share` as in `make_sample` (a training mix: the split is still decided by
    content, so no test pair enters training)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    unknown = set(task_weights or ()) - set(TASKS)
    if unknown or any(w < 0 for w in (task_weights or {}).values()):
        raise ValueError(f"task_weights: tasks are {TASKS} with weights >= 0, got {task_weights!r}")
    if object_weights is not None and (len(object_weights) != 4 or min(object_weights) < 0
                                       or not sum(object_weights) > 0):
        raise ValueError(f"object_weights: four weights >= 0 (of 1-4 objects), not all 0, got {object_weights!r}")
    if not 0.0 <= color_share <= 1.0:
        raise ValueError(f"color_share: a probability in [0, 1], got {color_share!r}")
    seed, count = start_seed, 0
    while count < n:
        s = make_sample(seed, task_weights, object_weights, color_share)
        if split_of(s) == split:
            yield s
            count += 1
        seed += 1


def vocabulary_words() -> list[str]:
    """Every word of the task (lower case), for the tokenizer."""
    words = set(TEMPLATE_WORDS) | set(COLORS) | set(SHAPES) | set(WORDS) | set(NUMBERS)
    for p in PLACES:
        words.update(p.split())
    return sorted(words)

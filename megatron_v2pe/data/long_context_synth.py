"""Synthetic long-context image-text samples with exact answers, drawn procedurally with Pillow.

Three families, after the data V2PE trains and evaluates on:

- ``mmniah``: MM-NIAH-style needles in an interleaved haystack of filler paragraphs and scene images.
  Tasks {retrieval, counting, reasoning} x needles {text, image}: a text needle is a sentence, an image
  needle is an icon (star or cross, shapes that scenes never contain) pasted into haystack images.
  Answers are a number, a list (counting) or an option letter.
- ``longvqa``: Long-VQA-style: many small scene images stitched into one sample, then one question per
  image ("how many red circles in image 7?"), each answered exactly.
- ``longmr``: Long-MR-style: a target scene inserted at a chosen depth into an interleaved document;
  retrieval (which image shows it), counting (how many images show it) or reasoning (compare counts).

Context length is steered by an estimate (tokens per image, tokens per word); the chosen depth is where
the needle goes, as a fraction of the haystack. Every sample records its task, answer and depth(s) in
``metadata``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from megatron_v2pe.data.images import encode_png
from megatron_v2pe.data.shards import ShardWriter

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 170),
    "orange": (240, 130, 20),
}
SCENE_SHAPES = ("circle", "square", "triangle", "diamond")
NEEDLE_SHAPES = ("star", "cross")
FAMILIES = ("mmniah", "longvqa", "longmr")
MMNIAH_TASKS = ("retrieval", "counting", "reasoning")
NEEDLE_KINDS = ("text", "image")
OPTION_LETTERS = "ABCD"

_SUBJECTS = (
    "The farmer",
    "A traveller",
    "The old sailor",
    "My neighbour",
    "The teacher",
    "A child",
    "The baker",
)
_VERBS = ("walked to", "painted", "talked about", "looked at", "forgot", "remembered", "described")
_PLACES = ("the river", "a wooden bridge", "the market", "an empty field", "the lighthouse", "a small garden")
_TIMES = ("in the morning", "after lunch", "at dusk", "on a rainy day", "last winter", "before the storm")
_ANIMALS = ("otter", "falcon", "badger", "heron", "lynx", "gecko", "walrus", "koala")
_NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana")


@dataclass(frozen=True)
class SynthConfig:
    """image_size: side of the drawn images (use the model's tile size for one tile per image).
    tokens_per_image and tokens_per_word only steer how much haystack reaches context_tokens."""

    image_size: int = 448
    tokens_per_image: int = 256
    tokens_per_word: float = 1.5
    words_per_paragraph: int = 40
    max_scene_objects: int = 4


@dataclass
class SynthSample:
    key: str
    conversations: list[dict[str, str]]
    images: list[Image.Image]
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Drawing and filler text


def _shape_points(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2, 0.4, 1.0)
        return list(zip(cx + rx * radius * np.cos(angles), cy - ry * radius * np.sin(angles), strict=True))
    if shape == "cross":
        a, b = 0.3, 1.0
        corners = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
        return [(cx + rx * u, cy + ry * v) for u, v in corners]
    raise ValueError(f"unknown shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, color: str, box: tuple[float, float, float, float]) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon(_shape_points(shape, box), fill=COLORS[color])


def _cells(
    rng: np.random.Generator, count: int, width: int, height: int
) -> list[tuple[float, float, float, float]]:
    """`count` non-overlapping square boxes: centred in random cells of a grid just large enough, with
    random margins."""
    side = int(np.ceil(np.sqrt(count)))
    cell_w, cell_h = width / side, height / side
    boxes = []
    for p in rng.choice(side * side, size=count, replace=False):
        half = min(cell_w, cell_h) * rng.uniform(0.25, 0.4)
        cx, cy = (p % side + 0.5) * cell_w, (p // side + 0.5) * cell_h
        boxes.append((cx - half, cy - half, cx + half, cy + half))
    return boxes


def draw_scene(
    rng: np.random.Generator, objects: Sequence[tuple[str, str]], width: int, height: int
) -> Image.Image:
    """An image of the (shape, color) objects on a light background, none overlapping."""
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(225, 256, size=3)))
    draw = ImageDraw.Draw(image)
    for (shape, color), box in zip(objects, _cells(rng, len(objects), width, height), strict=True):
        _draw(draw, shape, color, box)
    return image


def random_objects(
    rng: np.random.Generator, count: int, exclude: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """`count` random (shape, color) scene objects, none of them in `exclude`."""
    kinds = [(shape, color) for shape in SCENE_SHAPES for color in COLORS if (shape, color) not in exclude]
    return [kinds[i] for i in rng.integers(len(kinds), size=count)]


def draw_icons(rng: np.random.Generator, scene: Image.Image, icons: Sequence[tuple[str, str]]) -> None:
    """Draw needle icons side by side in the scene's top strip, which scenes leave free (see _scene)."""
    draw = ImageDraw.Draw(scene)
    strip = scene.width / max(len(icons), 4)
    for k, icon in enumerate(icons):
        margin = strip * rng.uniform(0.05, 0.15)
        _draw(draw, *icon, (k * strip + margin, margin, (k + 1) * strip - margin, strip - margin))


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def filler_sentence(rng: np.random.Generator) -> str:
    return " ".join(str(rng.choice(words)) for words in (_SUBJECTS, _VERBS, _PLACES, _TIMES)) + "."


def filler_paragraph(rng: np.random.Generator, words: int) -> str:
    sentences: list[str] = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(filler_sentence(rng))
    return " ".join(sentences)


# --------------------------------------------------------------------------------------------------
# Documents: interleaved paragraphs and images


@dataclass
class _Document:
    items: list[str | Image.Image] = field(default_factory=list)
    scenes: list[list[tuple[str, str]]] = field(default_factory=list)  # objects of each image, in order

    @property
    def images(self) -> list[Image.Image]:
        return [item for item in self.items if isinstance(item, Image.Image)]

    def replace_image(self, k: int, image: Image.Image, objects: list[tuple[str, str]]) -> None:
        """Put a new scene in place of the k-th image."""
        positions = [i for i, item in enumerate(self.items) if isinstance(item, Image.Image)]
        self.items[positions[k]] = image
        self.scenes[k] = objects

    def render(self) -> str:
        return "\n".join("<image>" if isinstance(item, Image.Image) else item for item in self.items)


def _scene(
    rng: np.random.Generator,
    config: SynthConfig,
    include: Sequence[tuple[str, str]] = (),
    exclude: Sequence[tuple[str, str]] = (),
) -> tuple[Image.Image, list[tuple[str, str]]]:
    """A scene with the `include` objects plus random others, drawn in the lower three quarters of the
    image: the top strip stays free for needle icons."""
    extra = int(rng.integers(1, config.max_scene_objects + 1)) - len(include)
    objects = [*include, *random_objects(rng, max(extra, 0), exclude)]
    size = config.image_size
    image = Image.new("RGB", (size, size), (245, 245, 240))
    image.paste(draw_scene(rng, objects, size, size - size // 4), (0, size // 4))
    return image, objects


def _haystack(
    rng: np.random.Generator,
    context_tokens: int,
    config: SynthConfig,
    exclude: Sequence[tuple[str, str]] = (),
) -> _Document:
    """Paragraphs and scene images, alternating, until the estimated length reaches context_tokens."""
    document, tokens = _Document(), 0
    while tokens < context_tokens or not document.scenes:
        paragraph = filler_paragraph(rng, config.words_per_paragraph)
        image, objects = _scene(rng, config, exclude=exclude)
        document.items += [paragraph, image]
        document.scenes.append(objects)
        tokens += int(len(paragraph.split()) * config.tokens_per_word) + config.tokens_per_image
    return document


def _insert_text(document: _Document, depth: float, sentence: str) -> None:
    """Insert a sentence inside the paragraph at `depth` (0 = first paragraph, 1 = last)."""
    paragraphs = [i for i, item in enumerate(document.items) if isinstance(item, str)]
    index = paragraphs[round(depth * (len(paragraphs) - 1))]
    sentences = document.items[index].split(". ")
    sentences.insert(len(sentences) // 2, sentence.rstrip("."))
    document.items[index] = ". ".join(sentences)


def _image_at(document: _Document, depth: float) -> int:
    return round(depth * (len(document.scenes) - 1))


def _icon_image(icon: tuple[str, str], config: SynthConfig) -> Image.Image:
    size = config.image_size
    image = Image.new("RGB", (size, size), (250, 250, 250))
    _draw(ImageDraw.Draw(image), *icon, (size * 0.2, size * 0.2, size * 0.8, size * 0.8))
    return image


def _sample(
    key: str,
    document: _Document,
    question: str,
    answer: str,
    extra_images: Sequence[Image.Image] = (),
    **metadata: object,
) -> SynthSample:
    return SynthSample(
        key=key,
        conversations=[
            {"from": "human", "value": f"{document.render()}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        images=document.images + list(extra_images),
        metadata={"answer": answer, **metadata},
    )


# --------------------------------------------------------------------------------------------------
# MM-NIAH


def mm_niah(
    key: str,
    task: str,
    needle: str,
    context_tokens: int,
    depth: float,
    rng: np.random.Generator,
    config: SynthConfig,
) -> SynthSample:
    """One MM-NIAH-style sample; text needles go at `depth` (counting/reasoning spread more needles
    from there to the end), image needles into the image at `depth`."""
    if task not in MMNIAH_TASKS or needle not in NEEDLE_KINDS:
        raise ValueError(
            f"task must be one of {MMNIAH_TASKS} and needle one of {NEEDLE_KINDS}, got {task!r}, {needle!r}"
        )
    document = _haystack(rng, context_tokens, config)
    depths = [depth] if task == "retrieval" else sorted(rng.uniform(depth, 1.0, size=3).round(3).tolist())
    meta = {
        "family": "mmniah",
        "task": f"{task}-{needle}",
        "depths": depths,
        "context_tokens": context_tokens,
    }
    if needle == "text":
        return _text_needles(key, document, task, depths, rng, meta)
    return _image_needles(key, document, task, depths, rng, config, meta)


def _text_needles(
    key: str, document: _Document, task: str, depths: list[float], rng: np.random.Generator, meta: dict
) -> SynthSample:
    if task == "retrieval":
        animal, code = str(rng.choice(_ANIMALS)), int(rng.integers(100, 1000))
        _insert_text(document, depths[0], f"The secret code of the {animal} is {code}.")
        return _sample(
            key,
            document,
            f"What is the secret code of the {animal}? Answer with the number.",
            str(code),
            **meta,
        )
    if task == "counting":
        counts = rng.integers(1, 10, size=len(depths)).tolist()
        for d, c in zip(depths, counts, strict=True):
            _insert_text(document, d, f"The little penguin counted {c} needles.")
        question = (
            "List, in order of appearance, the numbers of needles the little penguin counted, like [1, 2]."
        )
        return _sample(key, document, question, str(counts), **meta)
    names = [str(n) for n in rng.choice(_NAMES, size=3, replace=False)]  # names[0] > names[1] > names[2]
    _insert_text(document, depths[0], f"{names[0]} is taller than {names[1]}.")
    _insert_text(document, depths[-1], f"{names[1]} is taller than {names[2]}.")
    order = ", ".join(str(n) for n in rng.permutation(names))
    return _sample(key, document, f"Who is the tallest of {order}? Answer with the name.", names[0], **meta)


def _image_needles(
    key: str,
    document: _Document,
    task: str,
    depths: list[float],
    rng: np.random.Generator,
    config: SynthConfig,
    meta: dict,
) -> SynthSample:
    images = document.images
    icons = [(shape, color) for shape in NEEDLE_SHAPES for color in COLORS]
    placed: list[list[tuple[str, str]]] = [[] for _ in images]
    if task == "retrieval":
        options = [icons[i] for i in rng.choice(len(icons), size=4, replace=False)]
        correct = int(rng.integers(4))
        placed[_image_at(document, depths[0])].append(options[correct])
        question = (
            "Which of these four images appears inside one of the images above? "
            + " ".join(f"{letter}: <image>" for letter in OPTION_LETTERS)
            + " Answer with the letter."
        )
        extra, answer = [_icon_image(icon, config) for icon in options], OPTION_LETTERS[correct]
    elif task == "counting":
        icon = icons[int(rng.integers(len(icons)))]
        for d in depths:
            placed[_image_at(document, d)] += [icon] * int(rng.integers(1, 4))
        question = (
            f"How many {icon[1]} {_plural(icon[0])} does each image contain? "
            "Answer with a list, one count per image."
        )
        extra, answer = [], str([len(icons_here) for icons_here in placed])
    else:
        star, cross = ("star", str(rng.choice(list(COLORS)))), ("cross", str(rng.choice(list(COLORS))))
        more = int(rng.integers(2, 5))
        counts = (
            {star: more, cross: int(rng.integers(1, more))}
            if rng.integers(2)
            else {star: int(rng.integers(1, more)), cross: more}
        )
        for icon, count in counts.items():
            for d in rng.uniform(depths[0], 1.0, size=count):
                placed[_image_at(document, float(d))].append(icon)
        question = (
            "Which icon appears more often in the images above? "
            f"A: the {star[1]} star B: the {cross[1]} cross. Answer with the letter."
        )
        extra, answer = [], "A" if counts[star] > counts[cross] else "B"
    for image, icons_here in zip(images, placed, strict=True):
        draw_icons(rng, image, icons_here)
    return _sample(key, document, question, answer, extra, **meta)


# --------------------------------------------------------------------------------------------------
# Long-VQA and Long-MR


def long_vqa(key: str, context_tokens: int, rng: np.random.Generator, config: SynthConfig) -> SynthSample:
    """Numbered scene images, then one question per image about the count of one kind of object."""
    count = max(1, context_tokens // (config.tokens_per_image + 8))
    asked = random_objects(rng, count)
    scenes = [_scene(rng, config, include=[kind] * int(rng.integers(1, 4))) for kind in asked]
    listing = "\n".join(f"Image {k + 1}: <image>" for k in range(count))
    conversations = [
        {"from": "human", "value": f"{listing}\nAnswer questions about these images."},
        {"from": "gpt", "value": "Sure."},
    ]
    answers = []
    for k in rng.permutation(count)[: min(count, 8)]:
        shape, color = asked[k]
        answer = str(scenes[k][1].count(asked[k]))
        conversations += [
            {"from": "human", "value": f"How many {color} {_plural(shape)} are in image {k + 1}?"},
            {"from": "gpt", "value": answer},
        ]
        answers.append(answer)
    meta = {"family": "longvqa", "task": "count", "answer": answers, "context_tokens": context_tokens}
    return SynthSample(key, conversations, [image for image, _ in scenes], meta)


def long_mr(
    key: str, task: str, context_tokens: int, depth: float, rng: np.random.Generator, config: SynthConfig
) -> SynthSample:
    """A document with target scenes: the only images showing a target kind of object, one of them at
    `depth`. Retrieval: which image shows it; counting: how many; reasoning: which of two targets is
    shown by more images."""
    if task not in MMNIAH_TASKS:
        raise ValueError(f"task must be one of {MMNIAH_TASKS}, got {task!r}")
    kinds = [(shape, color) for shape in SCENE_SHAPES for color in COLORS]
    targets = [kinds[i] for i in rng.choice(len(kinds), size=2, replace=False)]
    document = _haystack(rng, context_tokens, config, exclude=targets)
    n = len(document.scenes)
    anchor = _image_at(document, depth)
    others = [int(k) for k in rng.permutation(n) if k != anchor]
    if task == "retrieval":
        shown = {targets[0]: [anchor]}
    elif task == "counting":
        shown = {targets[0]: [anchor, *others[: int(rng.integers(0, 3))]]}
    else:  # different numbers of images for the two targets, 1-3 and 0-3, within the n images
        pairs = [(a, b) for a in range(1, 4) for b in range(4) if a != b and a + b <= n]
        first, second = pairs[int(rng.integers(len(pairs)))]
        shown = {
            targets[0]: [anchor, *others[: first - 1]],
            targets[1]: others[first - 1 : first - 1 + second],
        }
    for target, images in shown.items():
        for k in images:
            image, objects = _scene(rng, config, include=[target], exclude=targets)
            document.replace_image(k, image, objects)
    (shape, color) = targets[0]
    meta = {"family": "longmr", "task": task, "depths": [depth], "context_tokens": context_tokens}
    if task == "retrieval":
        question = f"Which image (counting from 1) shows {_article(color)} {shape}? Answer with the number."
        return _sample(key, document, question, str(anchor + 1), **meta)
    if task == "counting":
        question = f"How many images show {_article(color)} {shape}? Answer with the number."
        return _sample(key, document, question, str(len(shown[targets[0]])), **meta)
    shape2, color2 = targets[1]
    question = (
        f"Do more images show {_article(color)} {shape} than {_article(color2)} {shape2}? Answer yes or no."
    )
    answer = "yes" if len(shown[targets[0]]) > len(shown.get(targets[1], [])) else "no"
    return _sample(key, document, question, answer, **meta)


# --------------------------------------------------------------------------------------------------
# Batches of samples and shards


def generate(
    family: str,
    count: int,
    seed: int,
    config: SynthConfig,
    context_tokens: Sequence[int] = (2048,),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> Iterator[SynthSample]:
    """`count` samples of a family, cycling through tasks, context lengths and depths; deterministic."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    rng = np.random.default_rng(seed)
    for i in range(count):
        key = f"{family}-{seed}-{i:06d}"
        length = int(context_tokens[i % len(context_tokens)])
        depth = float(depths[(i // len(context_tokens)) % len(depths)])
        if family == "mmniah":
            task, needle = MMNIAH_TASKS[i % 3], NEEDLE_KINDS[(i // 3) % 2]
            yield mm_niah(key, task, needle, length, depth, rng, config)
        elif family == "longvqa":
            yield long_vqa(key, length, rng, config)
        else:
            yield long_mr(key, MMNIAH_TASKS[i % 3], length, depth, rng, config)


def write_samples(
    samples: Iterator[SynthSample] | Sequence[SynthSample], directory: str | Path, max_bytes: int = 1 << 30
) -> Path:
    """Shards (PNG images, lossless so answers stay exact) and their manifest; returns the manifest."""
    with ShardWriter(directory, prefix="synth", max_bytes=max_bytes) as writer:
        for sample in samples:
            record = {"conversations": sample.conversations, "metadata": sample.metadata}
            writer.write(sample.key, record, [("png", encode_png(image)) for image in sample.images])
    return Path(directory) / "manifest.json"

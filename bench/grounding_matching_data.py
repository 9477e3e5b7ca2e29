"""How well can matching be done at all? False negatives among the mismatched pairs of a world.

    python bench/grounding_matching_data.py --boxes 1 --max-objects 1 --feature-dim 64
    python bench/grounding_matching_data.py --boxes 10 --max-objects 1 --feature-dim 64

Pre-training's matching task labels a pair "mismatched" when its sentence was drawn from another
image (``lxtrain.data.collate``: any sentence of another buffered image, questions included). In a
small world such a sentence may still be true of the image shown ("what color is the dog?" drawn
from another dog picture). This draws pairs the way the loader does (one sentence of the image,
or with probability ``--mismatch`` one of a uniformly drawn other image) from the synthetic
generator itself, decides from the world's ground truth whether each sentence *could* have been
said of the image shown, and prints per sentence type:

- the share of mismatched pairs that are consistent with the image (false negatives), and
- the share of matched pairs that a "consistent = matched" rule gets right,

and the accuracy ceiling of a matcher that knows the world perfectly and answers "matched"
exactly when the sentence is consistent (ties broken towards "matched", the prior at 50%).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict

import numpy as np

from lxtrain.synthetic.pretraining import COLORS, COUNT_WORDS, OBJECT_CLASSES, SIZES, World, make_image

_SINGULAR = {name: index for index, (name, _) in enumerate(OBJECT_CLASSES)}
_PLURAL = {plural: index for index, (_, plural) in enumerate(OBJECT_CLASSES)}


def objects_of(regions, world: World) -> list[tuple[int, int, int]]:
    """(class, colour, size) of every object region, from the detector labels and box areas."""
    found = []
    area = (regions.boxes[:, 2] - regions.boxes[:, 0]) * (regions.boxes[:, 3] - regions.boxes[:, 1])
    share = area / (regions.img_w * regions.img_h)
    for cls, color, part in zip(
        regions.objects_id.tolist(), regions.attrs_id.tolist(), share.tolist(), strict=True
    ):
        if cls < len(OBJECT_CLASSES):  # background classes follow the object classes
            found.append((cls, color, int(part > 0.14)))  # small areas <= 0.08, big >= 0.2
    return found


def sentence_type(text: str) -> str:
    """The template a synthetic sentence came from."""
    for prefix, name in (
        ("a picture of", "caption: a picture of X"),
        ("there are", "caption: there are N Xs"),
        ("what color", "question: what color is X"),
        ("is there", "question: is there a X"),  # before "is the", its prefix
        ("is the", "question: is X big or small"),
        ("what is the", "question: what is the C object"),
        ("how many", "question: how many Xs"),
    ):
        if text.startswith(prefix):
            return name
    return "caption: a X next to a Y" if " next to " in text else "caption: a C X and the S"


def consistent(text: str, objects: list[tuple[int, int, int]]) -> bool:
    """Could this sentence have been said of an image holding ``objects``?"""
    counts = Counter(cls for cls, _, _ in objects)
    words = re.findall(r"[a-z]+", text.lower())
    kind = sentence_type(text)
    if kind.startswith("question: is there"):
        return True  # asked of present and absent classes alike: no evidence either way
    if kind.startswith("question: how many"):
        return counts[_PLURAL[words[2]]] > 0
    if kind.startswith("question: what color") or kind.startswith("question: is X"):
        noun = words[4] if kind.startswith("question: what color") else words[2]
        return counts[_SINGULAR[noun]] == 1
    if kind.startswith("question: what is the"):
        color = COLORS.index(words[3])
        return sum(c == color for _, c, _ in objects) == 1
    if kind.startswith("caption: there are"):
        return counts[_PLURAL[words[3]]] == COUNT_WORDS.index(words[2])
    # Captions naming objects: each "[size] colour class" phrase must match some object.
    present = set(objects)
    for position, word in enumerate(words):
        if word in _SINGULAR:
            color = COLORS.index(words[position - 1])
            size = SIZES.index(words[position - 2]) if words[position - 2] in SIZES else None
            cls = _SINGULAR[word]
            if not any(o[0] == cls and o[1] == color and (size is None or o[2] == size) for o in present):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--boxes", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=1)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    world = World(feature_dim=args.feature_dim, boxes=args.boxes, max_objects=args.max_objects)
    embeddings = world.embeddings()
    images = [make_image(world, "train", index, 0, embeddings) for index in range(args.images)]
    sentences = [[text for texts in record["sentf"].values() for text in texts] for _, record in images]
    objects = [objects_of(regions, world) for regions, _ in images]

    rng = np.random.default_rng(args.seed)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # matched n/ok, mismatched n/consistent
    for _ in range(args.pairs):
        image = int(rng.integers(args.images))
        source = image
        if rng.random() < 0.5:
            source = int(rng.integers(args.images - 1))
            source += source >= image  # another image
        text = sentences[source][int(rng.integers(len(sentences[source])))]
        ok = consistent(text, objects[image])
        row = tally[sentence_type(text)]
        if source == image:
            row[0] += 1
            row[1] += ok
        else:
            row[2] += 1
            row[3] += ok

    print(
        f"world: {args.boxes} boxes, up to {args.max_objects} objects, {args.images} images, {args.pairs} pairs"
    )
    print(f"{'sentence type':40s} {'share':>6s} {'matched consistent':>19s} {'mismatched consistent':>22s}")
    total = [0, 0, 0, 0]
    for kind, row in sorted(tally.items()):
        total = [a + b for a, b in zip(total, row, strict=True)]
        share = (row[0] + row[2]) / args.pairs
        print(f"{kind:40s} {share:6.1%} {row[1] / max(row[0], 1):19.1%} {row[3] / max(row[2], 1):22.1%}")
    matched_ok, false_negative = total[1] / total[0], total[3] / total[2]
    ceiling = (total[1] + total[2] - total[3]) / (total[0] + total[2])
    print(f"{'all':40s} {1:6.0%} {matched_ok:19.1%} {false_negative:22.1%}")
    print(f"ceiling of a perfect 'consistent = matched' matcher: {ceiling:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

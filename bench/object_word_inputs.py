"""Masked object-word accuracy of an exported pre-training, split by what the input held there.

    python -m lxtrain.export RUN_DIR --out EXPORT
    python bench/object_word_inputs.py --model EXPORT --shards CORPUS/shards/valid [--zero-visual-input]

LXMERT keeps 10% of the selected words unchanged and replaces 10% by a random word, so a masked-LM
accuracy mixes three cases: [MASK] (the word must come from context or the image), kept (the word
is in the input: copying is enough) and random. This splits the object-word accuracy into them,
over the validation split's own masks (one process, so its masks differ from a two-rank run's).
"""

from __future__ import annotations

import argparse
import sys

import torch

from lxtrain import batch as B
from lxtrain.convert import load_model
from lxtrain.data.loader import build_valid_loader
from lxtrain.data.tokenizer import WordPieceEncoder
from lxtrain.synthetic.pretraining import OBJECT_CLASSES
from lxtrain.tasks.masking import IGNORE_INDEX
from lxtrain.tasks.objectives import PretrainingObjective


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an lxtrain export (python -m lxtrain.export)")
    parser.add_argument("--shards", required=True, help="validation shard directory")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (tiny preset: 4)")
    parser.add_argument("--zero-visual-input", action="store_true", help="the no-vision control's input")
    args = parser.parse_args(argv)

    encoder = WordPieceEncoder()
    object_words = torch.tensor(encoder.word_piece_ids(name for name, _ in OBJECT_CLASSES))
    model = load_model("lxtrain", args.model, num_attention_heads=args.heads)
    objective = PretrainingObjective(model, zero_visual_input=args.zero_visual_input).eval()
    tally = {"[MASK]": [0, 0], "kept": [0, 0], "random": [0, 0]}
    with torch.no_grad():
        for batch in build_valid_loader(args.shards, 128, num_workers=0):
            batch = B.to_device(batch, torch.device("cpu"))  # applies the shipped object masks
            correct_at = objective(batch, {"mlm": 1.0}).row_correct["mlm"]  # (B, T)
            labels, inputs = batch[B.MLM_LABELS], batch[B.INPUT_IDS]
            selected = labels != IGNORE_INDEX
            label, given, correct = labels[selected], inputs[selected], correct_at[selected]
            is_object_word = torch.isin(label, object_words)
            kinds = {
                "[MASK]": given == encoder.mask_id,
                "kept": given == label,
                "random": (given != label) & (given != encoder.mask_id),
            }
            for kind, where in kinds.items():
                tally[kind][0] += int(correct[is_object_word & where].sum())
                tally[kind][1] += int((is_object_word & where).sum())
    for kind, (hits, count) in tally.items():
        print(f"object words, input {kind:7s} {hits:4d}/{count:4d} = {hits / max(count, 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

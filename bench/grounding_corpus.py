"""Ablations of grounding on the synthetic corpus: the real loader and network, a plain loop.

    python -m lxtrain.synthetic.pretraining --out /tmp/w --images 3000 --feature-dim 64 --boxes 10 \
        --max-objects 1 --direct
    python bench/grounding_corpus.py --shards /tmp/w/shards --tasks mlm --mismatch 0 \
        --object-words-only --steps 1000

Trains the tiny network (one process, AdamW, no DeepSpeed: quick to iterate) on batches from
``build_pretrain_loader`` and prints, every ``--every`` steps, validation accuracy of the masked
object words (the class nouns of the synthetic world), of all masked words, of matching and of QA.
The switches remove one difficulty of pre-training at a time, to find which one keeps a small
model from grounding words in boxes (see docs/grounding.md):

- ``--mismatch P``: share of examples whose sentence comes from another image (0.5 in pre-training);
- ``--object-words-only``: masked-LM labels only at object words (the others are dropped);
- ``--unmasked``: the network sees the original RoI features (no 15% object masking);
- ``--zero-visual-input``: the no-vision control;
- ``--word-mask P``: masked-LM selection rate (0.15 in LXMERT);
- ``--object-word-mask P``: the loader masks object words at rate P, other words at
  ``--word-mask`` (lxtrain's ``--object-word-mask-probability``: an extension of LXMERT's recipe);
- ``--mask-all-object-words N``: for the first N steps (-1: all), every object word is replaced
  by [MASK] and labelled and no other word is (the densest grounding signal the sentences hold);
  afterwards the loader's masks;
- ``--init-range S``: standard deviation of the weight init (BERT's 0.02 is tuned for hidden 768,
  where a 0.02 matrix keeps a vector's norm at ~0.55x; at hidden 64 it shrinks it to ~0.16x);
- ``--dropout P`` and ``--clip N`` (0: no gradient clipping): optimisation knobs;
- ``--decay``: the demo's schedule (5% linear warm-up, then linear decay to 0 at ``--steps``)
  instead of a constant learning rate;
- ``--init EXPORT``: start from an lxtrain export (e.g. a grounded pre-training) instead of random
  weights; its network shape wins over ``--hidden`` and ``--dropout``;
- ``--in-batch-negatives P``: draw the mismatches inside the batch instead (use with
  ``--mismatch 0``): a share P of the rows get the image of another of those rows (a cyclic
  shift, so never their own), with its region labels, and lose their QA label, as the original
  LXMERT swapped images rather than sentences;
- ``--object-words-first N``: for the first N steps training sentences are cut down to
  [CLS] their object words [SEP] (a curriculum probe for matching: the comparison without the
  words around it), ``--object-words-share P`` of the rows (default all; the others keep their
  sentence and labels); validation always sees whole sentences;
- ``--train-every N``: print the training batch's matching loss and accuracy and the gradient norm
  of the pooler's weight (all of it from matching in a ``--tasks match`` run) every N steps;
- ``--grad-every N``: print the global gradient norm and the part of it from the RoI-feature
  projection's bias every N steps (masked boxes are all-zero features, so at initialisation that
  bias feeds a LayerNorm a constant vector and its gradient dominates the clipped global norm).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lxtrain import batch as B
from lxtrain import convert
from lxtrain.config import MODEL_PRESET_SIZES
from lxtrain.data.index import open_index
from lxtrain.data.loader import build_pretrain_loader, build_valid_loader
from lxtrain.data.tokenizer import WordPieceEncoder
from lxtrain.model.config import LxmertConfig
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.synthetic.pretraining import OBJECT_CLASSES
from lxtrain.tasks.masking import IGNORE_INDEX
from lxtrain.tasks.objectives import TASKS, PretrainingObjective
from lxtrain.tasks.validation import object_word_tally

SEP_ID = 102  # [SEP] in the BERT uncased vocabulary


def object_word_ids() -> tuple[torch.Tensor, int]:
    """(ids of the class nouns, id of [MASK]) in the BERT vocabulary."""
    encoder = WordPieceEncoder()
    return torch.tensor(encoder.word_piece_ids(name for name, _ in OBJECT_CLASSES)), encoder.mask_id


def mask_all_object_words(batch: dict, object_words: torch.Tensor, mask_id: int) -> None:
    """Replace every object word by [MASK] and label only those positions (in place)."""
    labels, ids = batch[B.MLM_LABELS], batch[B.INPUT_IDS]
    original = torch.where(labels != IGNORE_INDEX, labels, ids)
    is_object_word = torch.isin(original, object_words)
    batch[B.INPUT_IDS] = torch.where(is_object_word, mask_id, ids)
    batch[B.MLM_LABELS] = torch.where(is_object_word, original, IGNORE_INDEX)


@torch.no_grad()
def evaluate(objective: PretrainingObjective, shards: str, object_words: torch.Tensor) -> dict[str, float]:
    """Accuracy per task over the validation split (its own fixed masks and mismatches)."""
    objective.eval()
    correct: dict[str, float] = {}
    counts: dict[str, float] = {}
    for batch in build_valid_loader(shards, 128, num_workers=0):
        batch = B.to_device(batch, torch.device("cpu"))  # applies the shipped object masks
        out = objective(batch, dict.fromkeys(("mlm", "match", "qa"), 1.0))
        for task in out.counts:
            correct[task] = correct.get(task, 0.0) + float(out.correct[task])
            counts[task] = counts.get(task, 0.0) + float(out.counts[task])
        # The validation's own tally: every sentence, then only those describing the image shown.
        tally = object_word_tally(
            batch[B.MLM_LABELS], batch[B.MATCHED_LABELS], out.row_correct["mlm"], object_words
        )
        for name, (hits, count) in zip(
            ("object words", "object words, matched"), tally.tolist(), strict=True
        ):
            correct[name] = correct.get(name, 0.0) + hits
            counts[name] = counts.get(name, 0.0) + count
    objective.train()
    return {task: correct[task] / max(counts[task], 1.0) for task in correct}


def keep_only_object_words(batch: dict, object_words: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Shorten sentences to [CLS] their object words [SEP] (in place; those rows lose their masked-LM
    and QA labels). ``rows``: a boolean mask of the rows to shorten (default: all).

    The matching label stays: a matched sentence still names the image's object, a mismatched one
    another image's. A curriculum probe: the comparison without the rest of the sentence around it.
    """
    ids, labels = batch[B.INPUT_IDS], batch[B.MLM_LABELS]
    chosen = torch.ones(ids.shape[0], dtype=torch.bool) if rows is None else rows
    original = torch.where(labels != IGNORE_INDEX, labels, ids)
    keep = torch.isin(original, object_words)
    short = torch.zeros_like(ids)
    short[:, 0] = ids[:, 0]  # [CLS]
    for row in range(ids.shape[0]):
        words = original[row][keep[row]][: ids.shape[1] - 2]
        short[row, 1 : 1 + words.numel()] = words
        short[row, 1 + words.numel()] = SEP_ID
    mask = chosen[:, None]
    batch[B.INPUT_IDS] = torch.where(mask, short, ids)
    batch[B.ATTENTION_MASK] = torch.where(mask, (short != 0).long(), batch[B.ATTENTION_MASK])
    batch[B.TOKEN_TYPE_IDS] = torch.where(mask, 0, batch[B.TOKEN_TYPE_IDS])
    batch[B.MLM_LABELS] = torch.where(mask, IGNORE_INDEX, labels)
    batch[B.QA_LABELS] = torch.where(chosen, IGNORE_INDEX, batch[B.QA_LABELS])


# Per-image tensors of a batch after B.to_device: what moves with an image between rows.
IMAGE_KEYS = (
    B.OBJECT_FEATURES,
    B.FEATURE_TARGETS,
    B.OBJECT_BOXES,
    B.OBJECT_MASK,
    B.OBJECT_LABELS,
    B.OBJECT_CONFIDENCES,
    B.ATTRIBUTE_LABELS,
    B.ATTRIBUTE_CONFIDENCES,
)


def swap_images_in_batch(batch: dict, share: float, generator: torch.Generator) -> None:
    """Give a share of the rows another row's image (in place): in-batch negatives."""
    rows = torch.nonzero(torch.rand(batch[B.MATCHED_LABELS].shape[0], generator=generator) < share).flatten()
    if rows.numel() < 2:
        return
    donors = rows.roll(1)  # a cyclic shift among the chosen rows: nobody keeps its own image
    for key in IMAGE_KEYS:
        batch[key][rows] = batch[key][donors].clone()
    batch[B.MATCHED_LABELS][rows] = 0
    batch[B.QA_LABELS][rows] = IGNORE_INDEX


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="directory with train/ and valid/ shard sets")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated pre-training tasks")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64, help="tiny preset: 64; small: 256")
    parser.add_argument(
        "--cross-layers", type=int, default=1, help="cross-modality layers (tiny: 1; LXMERT: 5)"
    )
    parser.add_argument("--mismatch", type=float, default=0.5)
    parser.add_argument("--object-words-only", action="store_true")
    parser.add_argument("--unmasked", action="store_true")
    parser.add_argument("--zero-visual-input", action="store_true")
    parser.add_argument("--word-mask", type=float, default=0.15, help="masked-LM selection rate")
    parser.add_argument("--object-word-mask", type=float, default=None, help="object-word masking rate")
    parser.add_argument("--mask-all-object-words", type=int, default=0, metavar="STEPS")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--init-range",
        type=float,
        default=0.02,
        help="std of the weight init (BERT's 0.02; 1/sqrt(hidden) = 0.125 at 64)",
    )
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    parser.add_argument("--decay", action="store_true", help="5%% warm-up, then linear decay to 0")
    parser.add_argument("--object-words-first", type=int, default=0, metavar="STEPS")
    parser.add_argument("--object-words-share", type=float, default=1.0, help="rows shortened meanwhile")
    parser.add_argument("--in-batch-negatives", type=float, default=0.0, metavar="P")
    parser.add_argument("--train-every", type=int, default=0)
    parser.add_argument("--grad-every", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default=None, metavar="EXPORT", help="start from an lxtrain export")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    train, valid = f"{args.shards}/train", f"{args.shards}/valid"
    index = open_index(train)
    # The tiny preset's shape, at the width asked for.
    width = {
        "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden,
        "num_cross_layers": args.cross_layers,
    }
    config = LxmertConfig(
        **{**MODEL_PRESET_SIZES["tiny"], **width},
        visual_feature_dim=index.feature_dim,
        num_qa_labels=len(index.answers),
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        initializer_range=args.init_range,
    )
    if args.init:
        state, config = convert.read_lxtrain(args.init)
        model = LxmertForPretraining(config)
        model.load_state_dict(state)
    else:
        model = LxmertForPretraining(config)
    objective = PretrainingObjective(model, zero_visual_input=args.zero_visual_input)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=args.lr, weight_decay=0.01, eps=1e-6)
    warmup = max(1, int(0.05 * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min((step + 1) / warmup, max(0.0, (args.steps - step) / (args.steps - warmup)))
            if args.decay
            else 1.0
        ),
    )
    tasks = dict.fromkeys(args.tasks.split(","), 1.0)
    object_words, mask_id = object_word_ids()
    loader = build_pretrain_loader(
        train,
        args.batch,
        num_workers=1,
        seed=args.seed,
        mismatch_probability=args.mismatch,
        word_mask_probability=args.word_mask,
        object_word_ids=tuple(object_words.tolist()),
        object_word_mask_probability=args.object_word_mask,
    )
    feature_bias = objective.model.backbone.object_embeddings.feature_proj.bias
    # The bench's own per-row draws: the in-batch swaps and the curriculum's shortened rows.
    row_generator = torch.Generator().manual_seed(args.seed)
    started, step, epoch = time.monotonic(), 0, 0
    while step < args.steps:
        loader.set_epoch(epoch)
        for batch in loader:
            batch = B.to_device(batch, torch.device("cpu"))  # applies the shipped object masks
            if step < args.object_words_first:
                share = torch.rand(batch[B.INPUT_IDS].shape[0], generator=row_generator)
                keep_only_object_words(batch, object_words, share < args.object_words_share)
            elif args.mask_all_object_words < 0 or step < args.mask_all_object_words:
                mask_all_object_words(batch, object_words, mask_id)
            elif args.object_words_only:
                labels = batch[B.MLM_LABELS]
                batch[B.MLM_LABELS] = torch.where(torch.isin(labels, object_words), labels, IGNORE_INDEX)
            if args.unmasked:
                batch[B.OBJECT_FEATURES] = batch[B.FEATURE_TARGETS].clone()
            if args.in_batch_negatives:
                swap_images_in_batch(batch, args.in_batch_negatives, row_generator)
            out = objective(batch, tasks)
            optimizer.zero_grad()
            out.total.backward()
            if args.train_every and step % args.train_every == 0 and "match" in out.losses:
                pooler = objective.model.backbone.pooler.weight.grad
                print(
                    f"step {step:5d}  train match loss {float(out.losses['match'].detach()):.4f}  "
                    f"acc {float(out.correct['match']) / max(float(out.counts['match']), 1.0):.3f}  "
                    f"matched share {float(batch[B.MATCHED_LABELS].float().mean()):.2f}  "
                    f"pooler grad {float(pooler.norm()) if pooler is not None else 0.0:.2e}",
                    flush=True,
                )
            report_gradient = args.grad_every and step % args.grad_every == 0
            if report_gradient:  # read before clipping, which scales gradients in place
                bias_norm = float(feature_bias.grad.norm()) if feature_bias.grad is not None else 0.0
            max_norm = args.clip if args.clip > 0 else float("inf")
            total_norm = float(torch.nn.utils.clip_grad_norm_(objective.parameters(), max_norm))
            if report_gradient:
                print(
                    f"step {step:5d}  gradient norm {total_norm:.1f}, of it feature_proj.bias {bias_norm:.1f}"
                )
            optimizer.step()
            schedule.step()
            step += 1
            if step % args.every == 0:
                accuracy = evaluate(objective, valid, object_words)
                shown = "  ".join(f"{task} {value:.3f}" for task, value in accuracy.items())
                print(
                    f"step {step:5d} ({time.monotonic() - started:4.0f} s)  valid accuracy: {shown}",
                    flush=True,
                )
            if step >= args.steps:
                break
        epoch += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How fast can a small LXMERT learn each kind of image-text link? A controlled toy, no data files.

    python bench/grounding_toy.py --task comparison --steps 1500
    python bench/grounding_toy.py --task comparison --impl hf      (HF transformers' LXMERT)
    python bench/grounding_toy.py --task readout --label-share 0.15 --mismatch 0.5

Each image has ``--boxes`` regions: ``--objects`` objects of one of 16 classes and background
regions of 6 other classes; a region's feature is ``relu(class_embedding + 0.3 * noise)``. The
sentence is a single class word (binary tasks, through the cross-modality matching head) or
"a picture of a [MASK] ." (readout, through the masked-LM head). Tasks:

- ``language``: label = the word's class is one of the first 8 (text alone decides);
- ``vision``: label = some box is of class 0 (the image alone decides);
- ``comparison``: label = some box is of the word's class (needs word-to-box comparison: what
  matching, "is there a X?" and counting questions need);
- ``readout``: the masked word = the class of the image's object (vision -> word; what masked
  object-word prediction needs). ``--label-share`` of the rows carry the label and
  ``--mismatch`` of them see another row's image, as in pre-training.

Knobs: ``--filler N`` puts the class word at a random place among N other words (a sentence's
length; validation always has N), ``--short-first S`` trains the first S steps without them,
``--init-range``, ``--hidden`` and ``--cross-layers`` change the network.

It prints validation accuracy against the majority-label rate every ``--every`` steps, so the
step at which a link is learned (or that it is not) can be read off. Used to tell an
optimisation limit of the architecture at small sizes from a bug in the data path.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lxtrain import batch as B
from lxtrain.config import MODEL_PRESET_SIZES
from lxtrain.model.config import LxmertConfig
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.tasks.objectives import PretrainingObjective

NUM_CLASSES, NUM_BACKGROUND = 16, 6
CLS, SEP, MASK = 101, 102, 103
FIRST_WORD_ID = 2000  # class c is vocabulary entry 2000 + c
PICTURE_OF_A = (1037, 3861, 1997, 1037)  # "a picture of a"


def make_batch(
    args: argparse.Namespace, embeddings: torch.Tensor, size: int, clean: bool, filler: int | None = None
) -> dict:
    objects = torch.randint(0, NUM_CLASSES, (size, args.objects))
    background = torch.randint(NUM_CLASSES, NUM_CLASSES + NUM_BACKGROUND, (size, args.boxes - args.objects))
    labels = torch.cat([objects, background], 1)
    noise = 0.3 * torch.randn(size, args.boxes, embeddings.shape[1])
    if args.colour:  # the synthetic corpus's regions also carry one of 8 colours: a nuisance here
        noise += (
            args.colour * embeddings[torch.randint(0, 8, (size, args.boxes)) + NUM_CLASSES + NUM_BACKGROUND]
        )
    features = torch.relu(embeddings[labels] + noise)
    batch = {B.OBJECT_BOXES: torch.rand(size, args.boxes, 4)}
    if args.task == "readout":
        ids = torch.tensor([CLS, *PICTURE_OF_A, MASK, 1012, SEP]).repeat(size, 1)
        mlm = torch.full_like(ids, -100)
        mlm[:, 5] = FIRST_WORD_ID + objects[:, 0]
        if not clean:  # validation: every row labelled, every image its own
            mlm[torch.rand(size) >= args.label_share, 5] = -100
            swap = torch.rand(size) < args.mismatch
            features[swap] = features[swap].roll(1, 0)
        batch[B.MLM_LABELS] = mlm
    else:
        word = torch.randint(0, NUM_CLASSES, (size,))
        if args.task == "comparison":  # half the words name an object of the image
            word = torch.where(torch.rand(size) < 0.5, objects[:, 0], word)
        target = {
            "language": word < NUM_CLASSES // 2,
            "vision": (labels == 0).any(1),
            "comparison": (labels == word[:, None]).any(1),
        }[args.task]
        # The class word among --filler other words (a random place; vocabulary entries 3000-3019).
        filler = args.filler if filler is None else filler
        words = torch.randint(3000, 3020, (size, filler + 1))
        words[torch.arange(size), torch.randint(0, filler + 1, (size,))] = FIRST_WORD_ID + word
        ids = torch.cat([torch.full((size, 1), CLS), words, torch.full((size, 1), SEP)], 1)
        if args.no_cue and not clean:  # the class word becomes a filler word: the label stays
            dropped = torch.rand(size) < args.no_cue
            ids[dropped, 1:-1] = torch.where(
                ids[dropped, 1:-1] >= FIRST_WORD_ID + NUM_CLASSES, ids[dropped, 1:-1], 3000
            )
        if args.mask_boxes and not clean:  # LXMERT's object masking zeroes a region's feature
            features[torch.rand(size, args.boxes) < args.mask_boxes] = 0.0
        batch[B.MATCHED_LABELS] = target.long()
    batch.update(
        {B.INPUT_IDS: ids, B.ATTENTION_MASK: torch.ones_like(ids), B.TOKEN_TYPE_IDS: torch.zeros_like(ids)}
    )
    batch[B.OBJECT_FEATURES] = features
    return batch


class Lxtrain:
    """lxtrain's network and objective."""

    def __init__(self, config: LxmertConfig, task: str) -> None:
        self.task = "mlm" if task == "readout" else "match"
        self.objective = PretrainingObjective(LxmertForPretraining(config))
        self.module = self.objective

    def loss_and_correct(self, batch: dict) -> tuple[torch.Tensor, float, float]:
        out = self.objective(batch, {self.task: 1.0})
        return out.total, float(out.correct[self.task]), float(out.counts[self.task])


class HuggingFace:
    """HF transformers' LxmertForPreTraining with the same sizes (binary tasks only)."""

    def __init__(self, config: LxmertConfig, task: str) -> None:
        if task == "readout":
            raise SystemExit("--impl hf supports the binary tasks (language, vision, comparison)")
        from transformers import LxmertConfig as HFConfig
        from transformers import LxmertForPreTraining

        hf_config = HFConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            l_layers=config.num_language_layers,
            r_layers=config.num_object_layers,
            x_layers=config.num_cross_layers,
            visual_feat_dim=config.visual_feature_dim,
            num_qa_labels=2,
            task_mask_lm=False,
            task_obj_predict=False,
            task_qa=False,
            visual_obj_loss=False,
            visual_attr_loss=False,
            visual_feat_loss=False,
        )
        self.module = LxmertForPreTraining(hf_config)

    def loss_and_correct(self, batch: dict) -> tuple[torch.Tensor, float, float]:
        labels = batch[B.MATCHED_LABELS]
        out = self.module(
            input_ids=batch[B.INPUT_IDS],
            visual_feats=batch[B.OBJECT_FEATURES],
            visual_pos=batch[B.OBJECT_BOXES],
            matched_label=labels,
        )
        correct = (out.cross_relationship_score.argmax(-1) == labels).sum()
        return out.loss, float(correct), float(labels.numel())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--task", choices=("language", "vision", "comparison", "readout"), default="comparison"
    )
    parser.add_argument("--impl", choices=("lxtrain", "hf"), default="lxtrain")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64, help="tiny preset: 64; small: 256")
    parser.add_argument("--boxes", type=int, default=10)
    parser.add_argument(
        "--short-first", type=int, default=0, metavar="STEPS", help="train without filler words for STEPS"
    )
    parser.add_argument("--colour", type=float, default=0.0, help="weight of a random colour in each region")
    parser.add_argument("--no-cue", type=float, default=0.0, help="training rows whose class word is removed")
    parser.add_argument(
        "--mask-boxes", type=float, default=0.0, help="training regions zeroed (LXMERT: 0.15)"
    )
    parser.add_argument("--filler", type=int, default=0, help="other words around the class word")
    parser.add_argument(
        "--cross-layers", type=int, default=1, help="cross-modality layers (tiny: 1; LXMERT: 5)"
    )
    parser.add_argument("--init-range", type=float, default=0.02, help="std of the weight init (BERT: 0.02)")
    parser.add_argument("--objects", type=int, default=3, help="objects per image (readout: the first)")
    parser.add_argument("--label-share", type=float, default=1.0, help="readout: share of labelled rows")
    parser.add_argument(
        "--mismatch", type=float, default=0.0, help="readout: share of rows with another image"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    feature_dim = 64
    embeddings = torch.randn(NUM_CLASSES + NUM_BACKGROUND, feature_dim)
    # 8 colour embeddings after them, from their own generator (the default runs draw as before).
    colours = torch.randn(8, feature_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    embeddings = torch.cat([embeddings, colours])
    # The tiny preset's shape, at the width asked for.
    width = {
        "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden,
        "num_cross_layers": args.cross_layers,
    }
    config = LxmertConfig(
        **{**MODEL_PRESET_SIZES["tiny"], **width},
        visual_feature_dim=feature_dim,
        num_qa_labels=2,
        initializer_range=args.init_range,
    )
    model = (Lxtrain if args.impl == "lxtrain" else HuggingFace)(config, args.task)
    optimizer = torch.optim.AdamW(model.module.parameters(), lr=args.lr, weight_decay=0.01, eps=1e-6)
    valid = make_batch(args, embeddings, 2000, clean=True)
    if args.task == "readout":
        majority = 1.0 / NUM_CLASSES
    else:
        share = valid[B.MATCHED_LABELS].float().mean().item()
        majority = max(share, 1 - share)
    print(
        f"task {args.task} ({args.impl}), hidden {args.hidden}, {args.boxes} boxes, majority {majority:.3f}"
    )
    for step in range(1, args.steps + 1):
        filler = 0 if step <= args.short_first else args.filler  # validation: always --filler
        loss, _, _ = model.loss_and_correct(make_batch(args, embeddings, args.batch, False, filler))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            model.module.eval()
            with torch.no_grad():
                _, correct, count = model.loss_and_correct(valid)
            model.module.train()
            print(
                f"step {step:6d}  train loss {loss.item():.3f}  valid accuracy {correct / count:.3f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

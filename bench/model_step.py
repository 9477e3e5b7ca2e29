"""Forward+backward throughput of lxtrain vs HF transformers ``LxmertForPreTraining``, same weights.

    python bench/model_step.py --size base --batch 32 --steps 3 --threads 2

Both models get the same config, weights, batch and torch thread count, in one process, in train
mode (dropout on), with every pre-training task active: lxtrain through
``lxtrain.tasks.objectives.PretrainingObjective``, eager and compiled (HF's 6.67 visual normaliser, so the two
losses are the same number), HF through its own ``loss`` with all labels. A step is
zero_grad + forward + loss + backward (no optimizer: it is the same for both). Steps of the two
models alternate so that machine noise hits both alike; total samples over total time of the timed
steps is reported (after one warm-up step each, which for the compiled variant includes compiling).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from lxtrain import batch as B
from lxtrain import convert
from lxtrain.model.config import LxmertConfig
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.tasks.masking import IGNORE_INDEX, mask_objects, mask_words
from lxtrain.tasks.objectives import HF_VISUAL_LOSS_NORMALIZER, TASKS, PretrainingObjective

SEQ_LEN, NUM_OBJECTS = 20, 36  # LXMERT pre-training shapes (SPEC 2)
CLS, SEP, MASK = 101, 102, 103


def synthetic_batch(config: LxmertConfig, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch with the pre-training shapes: padded sentences, 15% word and object masking."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch_size, SEQ_LEN), dtype=np.int64)
    for row, length in enumerate(rng.integers(8, SEQ_LEN + 1, size=batch_size)):
        ids[row, :length] = [CLS, *rng.integers(1000, config.vocab_size, size=length - 2), SEP]
    masked_ids, mlm_labels = mask_words(
        ids, rng, mask_token_id=MASK, vocab_size=config.vocab_size, special_token_ids=(CLS, SEP, 0)
    )
    shape = (batch_size, NUM_OBJECTS)
    features = np.maximum(rng.normal(size=(*shape, config.visual_feature_dim)), 0).astype(np.float32)
    masked_features, object_mask = mask_objects(features, rng, donor_features=features[::-1, 0])
    qa = np.where(
        rng.random(batch_size) < 0.3, rng.integers(0, config.num_qa_labels, batch_size), IGNORE_INDEX
    )
    tensors = {
        B.INPUT_IDS: masked_ids,
        B.ATTENTION_MASK: (ids != 0).astype(np.int64),
        B.TOKEN_TYPE_IDS: np.zeros_like(ids),
        B.OBJECT_FEATURES: masked_features,
        B.OBJECT_BOXES: np.sort(rng.random((*shape, 4)), axis=-1).astype(np.float32),
        B.MLM_LABELS: mlm_labels,
        B.FEATURE_TARGETS: features,
        B.OBJECT_MASK: object_mask,
        B.OBJECT_LABELS: rng.integers(0, config.num_object_labels, shape),
        B.OBJECT_CONFIDENCES: rng.random(shape).astype(np.float32),
        B.ATTRIBUTE_LABELS: rng.integers(0, config.num_attribute_labels, shape),
        B.ATTRIBUTE_CONFIDENCES: rng.random(shape).astype(np.float32),
        B.MATCHED_LABELS: rng.integers(0, 2, batch_size),
        B.QA_LABELS: qa.astype(np.int64),
    }
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in tensors.items()}


def build_models(config: LxmertConfig, seed: int = 0):
    """HF ``LxmertForPreTraining`` and the lxtrain model holding the same tensors (literal key map)."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.LxmertForPreTraining(convert.hf_config(config))
    hf_state = {key: t.detach().clone() for key, t in hf.state_dict().items() if key != convert.TIED_DECODER}
    model = LxmertForPretraining(config)
    model.load_state_dict(convert.rename(hf_state, {v: k for k, v in convert.key_map(config).items()}, "hf"))
    return hf.train(), model.train()


def step_functions(config, hf, model, batch, compile_mode: str = "off") -> dict[str, Callable[[], float]]:
    """name -> one zero_grad + forward + loss + backward, returning the loss.

    lxtrain runs through ``PretrainingObjective`` (what the engine wraps); with ``compile_mode``
    other than ``off`` a third entry runs the same objective as one ``torch.compile`` graph.
    """
    weights = dict.fromkeys(TASKS, 1.0)
    eager = PretrainingObjective(model, HF_VISUAL_LOSS_NORMALIZER).train()
    hf_inputs = {**convert.hf_model_inputs(batch), **convert.hf_pretraining_labels(batch)}

    def objective_step(objective: PretrainingObjective) -> Callable[[], float]:
        def step() -> float:
            model.zero_grad(set_to_none=True)
            loss = objective(batch, weights).total
            loss.backward()
            return loss.item()

        return step

    def hf_step() -> float:
        hf.zero_grad(set_to_none=True)
        loss = hf(**hf_inputs).loss
        loss.backward()
        return loss.item()

    steps = {"lxtrain": objective_step(eager), "hf": hf_step}
    if compile_mode != "off":
        compiled = PretrainingObjective(model, HF_VISUAL_LOSS_NORMALIZER, compile_mode=compile_mode).train()
        steps["lxtrain_compiled"] = objective_step(compiled)
    return steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", choices=("tiny", "base"), default="base", help="tiny test config or LXMERT-base"
    )
    parser.add_argument("--batch", type=int, default=32, help="examples per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (after 1 warm-up each)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both models")
    parser.add_argument("--count-flops", action="store_true", help="also count FLOPs of one step of each")
    parser.add_argument(
        "--compile",
        choices=("off", "default"),
        default="default",
        help="also time lxtrain compiled (default)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = LxmertConfig() if args.size == "base" else LxmertConfig.tiny()
    hf, model = build_models(config)
    batch = synthetic_batch(config, args.batch)
    steps = step_functions(config, hf, model, batch, args.compile)

    # Warm-up (allocator, first-call dispatch, compilation), then alternate so all see the same
    # machine state. Dropout masks differ between the models, so losses are only expected to be close.
    warm, compile_seconds = {}, {}
    for name, step in steps.items():
        started = time.perf_counter()
        warm[name] = step()
        compile_seconds[name] = time.perf_counter() - started
    if "lxtrain_compiled" in steps:
        print(f"first compiled step (compilation included): {compile_seconds['lxtrain_compiled']:.1f} s")
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)

    print(
        f"config={args.size} ({model.num_parameters() / 1e6:.1f}M params) batch={args.batch} "
        f"T={SEQ_LEN} O={NUM_OBJECTS} threads={args.threads} steps={args.steps} torch={torch.__version__}"
    )
    result = {}
    for name in steps:
        # Totals over all timed steps after warm-up: a slow step counts as much as a fast one.
        total_wall, total_cpu = sum(wall[name]), sum(cpu[name])
        result[name] = args.batch * args.steps / total_wall
        result[f"{name}_cpu"] = args.batch * args.steps / total_cpu
        print(
            f"{name:16s} {total_wall / args.steps:7.3f} s/step wall  {result[name]:8.2f} samples/s  "
            f"| {total_cpu / args.steps:7.3f} s/step CPU  {result[f'{name}_cpu']:8.2f} samples/CPU-s  "
            f"(wall steps {', '.join(f'{t:.2f}' for t in wall[name])}; warm-up loss {warm[name]:.4f})"
        )
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        for name, step in steps.items():
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            result[f"{name}_gflop"] = counter.get_total_flops() / 1e9
            print(f"{name:8s} {result[f'{name}_gflop']:9.1f} GFLOP per step (matmul-class ops)")
    # On a shared machine wall time also measures the neighbours; CPU time of this process is the
    # steadier comparison of work done, so both ratios are printed.
    for name, suffix in (("lxtrain", ""), ("lxtrain_compiled", "_compiled")):
        if name in steps:
            result[f"cpu_ratio{suffix}"] = result[f"{name}_cpu"] / result["hf_cpu"]
            result[f"ratio{suffix}"] = result[name] / result["hf"]
            print(
                f"{name} / hf throughput ratio: {result[f'cpu_ratio{suffix}']:.3f} (CPU time), "
                f"{result[f'ratio{suffix}']:.3f} (wall)"
            )
    return result


if __name__ == "__main__":
    main()

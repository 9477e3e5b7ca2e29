"""The training entry points on one CUDA GPU: NCCL and bf16, which the gloo/fp32 CPU runs cannot reach.

NCCL moves CUDA tensors only, so every collective on a CPU tensor (step flags, metric sums, the
best-validation broadcast) must make the trip through the GPU: these runs fail if one does not.
The optimizer is torch's fused AdamW so that the tests do not depend on nvcc building DeepSpeed's
FusedAdam (bench/gpu_pretrain.sh measures that one).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lxtrain import convert
from lxtrain.model import LxmertConfig, LxmertForPretraining
from lxtrain.synthetic import finetuning as synthetic_tasks
from lxtrain.synthetic.pretraining import World
from lxtrain.testing.faults import REPO, make_corpus, run_pretrain, step_losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _bf16_config(directory: Path, source: str, batch: int) -> Path:
    """A shipped bf16 config for one GPU at ``batch``, with torch's fused AdamW."""
    config = json.loads((REPO / "ds_configs" / source).read_text())
    config.update(train_batch_size=batch, train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1)
    params = config["optimizer"]["params"]
    params.pop("bias_correction")
    params.update(torch_adam=True, fused=True)
    path = directory / f"gpu_{source}"
    path.write_text(json.dumps(config))
    return path


def test_pretraining_on_one_gpu_with_nccl_and_bf16_validates_and_exports(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", images=48, feature_dim=32)
    output = tmp_path / "run"
    result = run_pretrain(
        corpus,
        output,
        "--max-steps",
        "4",
        "--object-words",
        "dog,cat,car",
        launcher="python",
        config=str(_bf16_config(tmp_path, "zero2_bf16.json", 8)),
        port=29671,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bf16" in result.stdout and "1 rank(s)" in result.stdout
    losses = step_losses(output)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(math.isfinite(value) for step in losses.values() for value in step.values())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    # Validation's metric sums (and its object-word and per-source QA counts) went through NCCL.
    assert {"valid/loss/mlm", "valid/acc/qa"} <= set(events.Tags()["scalars"])
    assert (output / "export").is_dir()


def test_finetuning_nlvr2_on_one_gpu_validates_and_exports_the_best(tmp_path):
    synthetic_tasks.generate(
        synthetic_tasks.TaskSetConfig(
            out=tmp_path / "tasks",
            images=40,
            sets=24,
            world=World(feature_dim=16, boxes=8, max_objects=4),
            shards=True,
        )
    )
    torch.manual_seed(0)
    model = LxmertForPretraining(LxmertConfig.tiny(visual_feature_dim=16, num_qa_labels=4))
    convert.write_lxtrain(model.state_dict(), model.config, tmp_path / "init")
    shards = tmp_path / "tasks" / "shards"
    command = [
        sys.executable,
        str(REPO / "lxtrain" / "finetune.py"),
        "--task",
        "nlvr2",
        "--deepspeed_config",
        str(_bf16_config(tmp_path, "finetune_nlvr2.json", 8)),
        "--init",
        str(tmp_path / "init"),
        "--train-shards",
        str(shards / "nlvr2_train"),
        "--valid-shards",
        str(shards / "nlvr2_valid"),
        "--output-dir",
        str(tmp_path / "out"),
        "--max-steps",
        "3",
        "--valid-every",
        "1",
        "--log-every",
        "1",
        "--num-workers",
        "0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": "29672"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]
    # Validation after every step: the best-so-far decision was broadcast from rank 0 each time.
    records = (tmp_path / "out" / "validation.jsonl").read_text().splitlines()
    assert len(records) == 3 and all(0 <= json.loads(r)["accuracy"] <= 1 for r in records)
    assert (tmp_path / "out" / "best").is_dir()

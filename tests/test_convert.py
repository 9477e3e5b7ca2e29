"""Checkpoint interop: bit-exact round trips through lxtrain, the CLI, and strict refusal of bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lxtrain import convert
from lxtrain.convert import CheckpointError
from lxtrain.model.config import LxmertConfig

HEADS = LxmertConfig.tiny().num_attention_heads


def _assert_same_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(reference), (
        f"missing {sorted(set(reference) - set(ours))}, extra {sorted(set(ours) - set(reference))}"
    )
    differing = [key for key in reference if not torch.equal(ours[key], reference[key])]
    assert not differing, f"tensors changed by the round trip: {differing}"
    assert all(ours[key].dtype == reference[key].dtype for key in reference)


def _original_checkpoint(hf_model, path: Path, *, data_parallel: bool = False) -> dict[str, torch.Tensor]:
    """An original-release ``model_LXRT.pth``: HF's keys with ``bert.`` for ``lxmert.``, the tied
    decoder stored as its own entry, optionally every key under DataParallel's ``module.``."""
    state = {}
    for key, tensor in hf_model.state_dict().items():
        name = "bert." + key[len("lxmert.") :] if key.startswith("lxmert.") else key
        state[("module." if data_parallel else "") + name] = tensor.clone()
    assert convert.TIED_DECODER in {k.removeprefix("module.") for k in state}
    torch.save(state, path)
    return state


def test_hf_to_lxtrain_to_hf_is_bit_exact(hf_pair, tiny_config: LxmertConfig, tmp_path: Path) -> None:
    import transformers

    hf, model, hf_dir = hf_pair(tiny_config)
    state, config = convert.read("hf", hf_dir)
    assert config == tiny_config
    convert.write("lxtrain", state, config, tmp_path / "lx")
    state, config = convert.read("lxtrain", tmp_path / "lx")
    convert.write("hf", state, config, tmp_path / "hf-again")

    # Same key set and tensors as HF's own save_pretrained (which leaves out the tied decoder).
    _assert_same_tensors(
        load_file(tmp_path / "hf-again" / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    )
    # And HF itself loads the written directory into the same model.
    reloaded = transformers.LxmertForPreTraining.from_pretrained(tmp_path / "hf-again")
    _assert_same_tensors(reloaded.state_dict(), hf.state_dict())
    # The lxtrain model from the converter holds exactly HF's tensors.
    assert torch.equal(model.word_embeddings, hf.lxmert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("data_parallel", [False, True], ids=["plain", "module-prefix"])
def test_original_to_lxtrain_to_original_is_bit_exact(
    hf_pair, tiny_config: LxmertConfig, tmp_path: Path, data_parallel: bool
) -> None:
    hf, model, _ = hf_pair(tiny_config)
    source = tmp_path / "model_LXRT.pth"
    original = _original_checkpoint(hf, source, data_parallel=data_parallel)

    state, config = convert.read("original", source, num_attention_heads=HEADS)
    assert config == tiny_config  # every size read off the tensor shapes
    _assert_same_tensors(state, model.state_dict())  # the same weights as through HF
    convert.write("lxtrain", state, config, tmp_path / "lx")
    state, config = convert.read("lxtrain", tmp_path / "lx")
    convert.write("original", state, config, tmp_path / "again.pth")

    written = torch.load(tmp_path / "again.pth", map_location="cpu", weights_only=True)
    # The writer saves every key under DataParallel's prefix, as the released model_LXRT.pth has
    # them: the release's pre-training --loadLxmert keeps only "module." keys.
    assert all(key.startswith("module.") for key in written)
    _assert_same_tensors(written, {"module." + key.removeprefix("module."): t for key, t in original.items()})


def test_cli_end_to_end(hf_pair, tiny_config: LxmertConfig, tmp_path: Path, capsys) -> None:
    _, _, hf_dir = hf_pair(tiny_config)
    assert convert.main(["--from", "hf", "--to", "original", str(hf_dir), str(tmp_path / "lxrt.pth")]) == 0
    assert "hf -> original" in capsys.readouterr().out

    # One real subprocess: the module runs as `python -m lxtrain.convert`.
    command = [sys.executable, "-m", "lxtrain.convert", "--from", "original", "--to", "hf"]
    command += ["--num-attention-heads", str(HEADS), str(tmp_path / "lxrt.pth"), str(tmp_path / "hf-out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "original -> hf" in result.stdout
    _assert_same_tensors(
        load_file(tmp_path / "hf-out" / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    )


def test_cli_reports_bad_checkpoint(tmp_path: Path, capsys) -> None:
    assert (
        convert.main(["--from", "hf", "--to", "lxtrain", str(tmp_path / "nothing"), str(tmp_path / "out")])
        == 2
    )
    error = capsys.readouterr().err
    assert "lxtrain.convert: error:" in error and "no config.json" in error
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: each refused with the key, the expected and the found value.


@pytest.fixture
def hf_dir(hf_pair, tiny_config: LxmertConfig) -> Path:
    return hf_pair(tiny_config)[2]


def _edit_weights(directory: Path, edit) -> None:
    weights = load_file(directory / "model.safetensors")
    edit(weights)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_config(directory: Path, **values) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(values)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_key_is_named(hf_dir: Path) -> None:
    _edit_weights(hf_dir, lambda w: w.pop("lxmert.pooler.dense.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\).*lxmert\.pooler\.dense\.weight"):
        convert.read("hf", hf_dir)


def test_unexpected_key_is_named(hf_dir: Path) -> None:
    _edit_weights(hf_dir, lambda w: w.update({"lxmert.encoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\).*lxmert\.encoder\.extra\.weight"):
        convert.read("hf", hf_dir)


def test_answer_count_mismatch_names_key_expected_and_found(hf_dir: Path) -> None:
    _edit_config(hf_dir, num_qa_labels=17)
    with pytest.raises(CheckpointError) as caught:
        convert.read("hf", hf_dir)
    message = str(caught.value)
    assert "answer_head.logit_fc.3.weight" in message
    assert "expected (17, 64), found (16, 64)" in message
    assert (
        "answer_head.logit_fc.3.bias (lxtrain: answer_head.classifier.bias): expected (17,), found (16,)"
        in message
    )


def test_hidden_size_mismatch_names_key_expected_and_found(hf_dir: Path, tmp_path: Path) -> None:
    state, config = convert.read("hf", hf_dir)
    convert.write("lxtrain", state, config, tmp_path / "lx")
    values = json.loads((tmp_path / "lx" / convert.LXTRAIN_CONFIG).read_text())
    values["hidden_size"] = 64
    (tmp_path / "lx" / convert.LXTRAIN_CONFIG).write_text(json.dumps(values))
    with pytest.raises(
        CheckpointError, match=r"backbone\.pooler\.weight: expected \(64, 64\), found \(32, 32\)"
    ):
        convert.read("lxtrain", tmp_path / "lx")


def test_original_with_wrong_shape_or_untied_decoder(
    hf_pair, tiny_config: LxmertConfig, tmp_path: Path
) -> None:
    hf, _, _ = hf_pair(tiny_config)
    path = tmp_path / "model_LXRT.pth"
    state = _original_checkpoint(hf, path)
    # The answer head's bias disagrees with its weight: sizes come from the weight, the bias is refused.
    torch.save({**state, "answer_head.logit_fc.3.bias": torch.zeros(15)}, path)
    with pytest.raises(
        CheckpointError, match=r"answer_head\.logit_fc\.3\.bias.*expected \(16,\), found \(15,\)"
    ):
        convert.read("original", path, num_attention_heads=HEADS)
    untied = dict(state)
    untied[convert.TIED_DECODER] = state[convert.TIED_DECODER] + 1
    torch.save(untied, path)
    with pytest.raises(CheckpointError, match="differs from the word embeddings"):
        convert.read("original", path, num_attention_heads=HEADS)
    # Only some keys under "module.": nothing may load silently.
    partial = {("module." + k if k.startswith("bert.encoder") else k): t for k, t in state.items()}
    torch.save(partial, path)
    with pytest.raises(
        CheckpointError, match=r"keys carry the DataParallel 'module\.' prefix.*module\.bert\.encoder"
    ):
        convert.read("original", path, num_attention_heads=HEADS)

"""Move LXMERT weights between lxtrain, HF transformers and the original release.

    python -m lxtrain.convert --from {hf,original,lxtrain} --to {hf,original,lxtrain} SRC DST

Formats:
- ``lxtrain``: a directory with ``lxtrain_config.json`` (``LxmertConfig``) and ``model.safetensors``.
- ``hf``: a directory that ``transformers.LxmertForPreTraining.from_pretrained`` loads
  (``config.json`` plus ``model.safetensors``; reading also accepts sharded safetensors and
  ``pytorch_model.bin``).
- ``original``: the reference release's ``model_LXRT.pth``: a torch-saved state dict with ``bert.``
  in place of HF's ``lxmert.``, and a ``module.`` prefix when saved from DataParallel. It has no
  config: sizes are read off the tensor shapes, except the head count (``--num-attention-heads``).

The key maps are literal (one name to one name, no tensor is transformed), so conversions are
bit-exact. Loading is strict: missing keys, unexpected keys and shape mismatches are listed and
refused. Nothing here unpickles arbitrary objects (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lxtrain.model.config import LxmertConfig

FORMATS = ("hf", "original", "lxtrain")
# The released model_LXRT.pth was saved from torch.nn.DataParallel: every key carries this prefix.
DATA_PARALLEL_PREFIX = "module."
LXTRAIN_CONFIG = "lxtrain_config.json"
WEIGHTS = "model.safetensors"
StateDict = dict[str, torch.Tensor]

# The MLM decoder is tied to the word embeddings. HF omits it from saved files; the original
# release stores it as a second copy. lxtrain does not have it as a parameter at all.
TIED_DECODER = "cls.predictions.decoder.weight"
TIED_SOURCE = "backbone.text_embeddings.word.weight"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the keys, expected and found values."""


# --------------------------------------------------------------------------------------------
# The key map: (lxtrain module, HF module relative to its root, parameter names).
# Backbone modules live under "lxmert." in HF and "bert." in the original; heads have no root.
LINEAR = ("weight", "bias")
NORM = ("weight", "bias")
EMBEDDING = ("weight",)


def _attention_block(
    lx: str, hf_attention: str, hf_output: str
) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    for projection in ("query", "key", "value"):
        yield f"{lx}.attention.{projection}", f"{hf_attention}.{projection}", LINEAR
    yield f"{lx}.output", f"{hf_output}.dense", LINEAR
    yield f"{lx}.norm", f"{hf_output}.LayerNorm", NORM


def _feed_forward(lx: str, hf_inter: str, hf_output: str) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    yield f"{lx}.up", f"{hf_inter}.dense", LINEAR
    yield f"{lx}.down", f"{hf_output}.dense", LINEAR
    yield f"{lx}.norm", f"{hf_output}.LayerNorm", NORM


def _backbone_modules(config: LxmertConfig) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    yield "backbone.text_embeddings.word", "embeddings.word_embeddings", EMBEDDING
    yield "backbone.text_embeddings.position", "embeddings.position_embeddings", EMBEDDING
    yield "backbone.text_embeddings.token_type", "embeddings.token_type_embeddings", EMBEDDING
    yield "backbone.text_embeddings.norm", "embeddings.LayerNorm", NORM
    yield "backbone.object_embeddings.feature_proj", "encoder.visn_fc.visn_fc", LINEAR
    yield "backbone.object_embeddings.feature_norm", "encoder.visn_fc.visn_layer_norm", NORM
    yield "backbone.object_embeddings.box_proj", "encoder.visn_fc.box_fc", LINEAR
    yield "backbone.object_embeddings.box_norm", "encoder.visn_fc.box_layer_norm", NORM
    for stack, hf_stack, depth in (
        ("language_layers", "layer", config.num_language_layers),
        ("object_layers", "r_layers", config.num_object_layers),
    ):
        for i in range(depth):
            lx, hf = f"backbone.{stack}.{i}", f"encoder.{hf_stack}.{i}"
            yield from _attention_block(
                f"{lx}.self_attention", f"{hf}.attention.self", f"{hf}.attention.output"
            )
            yield from _feed_forward(f"{lx}.feed_forward", f"{hf}.intermediate", f"{hf}.output")
    for i in range(config.num_cross_layers):
        lx, hf = f"backbone.cross_layers.{i}", f"encoder.x_layers.{i}"
        yield from _attention_block(
            f"{lx}.cross_attention", f"{hf}.visual_attention.att", f"{hf}.visual_attention.output"
        )
        yield from _attention_block(
            f"{lx}.language_self_attention", f"{hf}.lang_self_att.self", f"{hf}.lang_self_att.output"
        )
        yield from _attention_block(
            f"{lx}.object_self_attention", f"{hf}.visn_self_att.self", f"{hf}.visn_self_att.output"
        )
        yield from _feed_forward(f"{lx}.language_feed_forward", f"{hf}.lang_inter", f"{hf}.lang_output")
        yield from _feed_forward(f"{lx}.object_feed_forward", f"{hf}.visn_inter", f"{hf}.visn_output")
    yield "backbone.pooler", "pooler.dense", LINEAR


_HEAD_MODULES = (
    ("mlm_head.dense", "cls.predictions.transform.dense", LINEAR),
    ("mlm_head.norm", "cls.predictions.transform.LayerNorm", NORM),
    ("matching_head", "cls.seq_relationship", LINEAR),
    ("object_head.dense", "obj_predict_head.transform.dense", LINEAR),
    ("object_head.norm", "obj_predict_head.transform.LayerNorm", NORM),
    ("object_head.object_classifier", "obj_predict_head.decoder_dict.obj", LINEAR),
    ("object_head.attribute_classifier", "obj_predict_head.decoder_dict.attr", LINEAR),
    ("object_head.feature_regressor", "obj_predict_head.decoder_dict.feat", LINEAR),
    ("answer_head.dense", "answer_head.logit_fc.0", LINEAR),
    ("answer_head.norm", "answer_head.logit_fc.2", NORM),
    ("answer_head.classifier", "answer_head.logit_fc.3", LINEAR),
)


def key_map(config: LxmertConfig, backbone_root: str = "lxmert.") -> dict[str, str]:
    """lxtrain parameter name -> peer name (HF with ``lxmert.``, the original with ``bert.``)."""
    mapping = {"mlm_head.bias": "cls.predictions.bias"}
    for lx, peer, names in _backbone_modules(config):
        mapping.update({f"{lx}.{name}": f"{backbone_root}{peer}.{name}" for name in names})
    for lx, peer, names in _HEAD_MODULES:
        mapping.update({f"{lx}.{name}": f"{peer}.{name}" for name in names})
    return mapping


# --------------------------------------------------------------------------------------------
# Strict checks.


def expected_shapes(config: LxmertConfig) -> dict[str, tuple[int, ...]]:
    """Every lxtrain parameter name and its shape for ``config`` (built on the meta device: no memory)."""
    from lxtrain.model.lxmert import LxmertForPretraining

    with torch.device("meta"):
        model = LxmertForPretraining(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: LxmertConfig,
    source: str,
    key_names: Mapping[str, str] | None = None,
) -> None:
    """Raise ``CheckpointError`` listing every missing key, unexpected key and shape mismatch.

    ``key_names`` (lxtrain name -> name in the source file) makes the message name keys as the
    user's file spells them, with the lxtrain name alongside.
    """

    def name(key: str) -> str:
        if key_names is None or key not in key_names:
            return key
        return f"{key_names[key]} (lxtrain: {key})"

    expected = expected_shapes(config)
    missing = [name(key) for key in sorted(set(expected) - set(state_dict))]
    unexpected = [name(key) for key in sorted(set(state_dict) - set(expected))]
    mismatched = [
        f"  {name(key)}: expected {expected[key]}, found {tuple(state_dict[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if mismatched:
        problems.append("shape mismatches (the config does not fit these weights):\n" + "\n".join(mismatched))
    if problems:
        raise CheckpointError(f"{source} does not fit the model config:\n" + "\n".join(problems))


def rename(state_dict: Mapping[str, torch.Tensor], mapping: Mapping[str, str], source: str) -> StateDict:
    """Apply a literal key map; any key it does not cover is an error, never silently dropped."""
    unknown = sorted(set(state_dict) - set(mapping))
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys ({len(unknown)}) with no mapping: {unknown}")
    return {mapping[key]: tensor for key, tensor in state_dict.items()}


def _invert(mapping: Mapping[str, str]) -> dict[str, str]:
    return {peer: lx for lx, peer in mapping.items()}


def _drop_tied_decoder(state_dict: StateDict, source: str) -> StateDict:
    """Remove the stored copy of the tied MLM decoder after checking it really is the tied copy."""
    decoder = state_dict.pop(TIED_DECODER, None)
    word = next((t for k, t in state_dict.items() if k.endswith("embeddings.word_embeddings.weight")), None)
    if decoder is not None and word is not None and not torch.equal(decoder, word):
        raise CheckpointError(
            f"{source}: {TIED_DECODER} differs from the word embeddings; LXMERT ties them, so this "
            "checkpoint is not an LXMERT pre-training model"
        )
    return state_dict


# --------------------------------------------------------------------------------------------
# Configs of the peers.

_HF_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "num_language_layers": "l_layers",
    "num_object_layers": "r_layers",
    "num_cross_layers": "x_layers",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "visual_feature_dim": "visual_feat_dim",
    "visual_position_dim": "visual_pos_dim",
    "hidden_dropout_prob": "hidden_dropout_prob",
    "attention_probs_dropout_prob": "attention_probs_dropout_prob",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
    "num_object_labels": "num_object_labels",
    "num_attribute_labels": "num_attr_labels",
    "num_qa_labels": "num_qa_labels",
}


def config_from_hf(hf_config: Mapping) -> LxmertConfig:
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"HF config hidden_act={act!r}: lxtrain implements LXMERT's exact 'gelu' only")
    return LxmertConfig(**{lx: hf_config[hf] for lx, hf in _HF_CONFIG_FIELDS.items() if hf in hf_config})


def config_to_hf(config: LxmertConfig) -> dict:
    """The fields of HF's ``config.json`` for the same network."""
    values = {hf: getattr(config, lx) for lx, hf in _HF_CONFIG_FIELDS.items()}
    values.update(architectures=["LxmertForPreTraining"], model_type="lxmert", hidden_act="gelu")
    return values


def hf_config(config: LxmertConfig):
    """The ``transformers.LxmertConfig`` of the same network (parity tests and benchmarks build HF
    models from it)."""
    import transformers

    values = config_to_hf(config)
    values.pop("model_type")  # a class attribute of transformers' config, not a constructor field
    return transformers.LxmertConfig(**values)


def infer_config(state_dict: Mapping[str, torch.Tensor], root: str, num_attention_heads: int) -> LxmertConfig:
    """Read sizes off an original-release state dict (it ships no config)."""

    def shape(key: str) -> tuple[int, ...]:
        if root + key not in state_dict and key not in state_dict:
            raise CheckpointError(f"cannot infer the config: key {root + key!r} is missing")
        return tuple(state_dict.get(root + key, state_dict.get(key)).shape)

    def depth(stack: str) -> int:
        pattern = re.compile(rf"^{re.escape(root)}encoder\.{stack}\.(\d+)\.")
        indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
        return max(indices) + 1 if indices else 0

    vocab_size, hidden_size = shape("embeddings.word_embeddings.weight")
    return LxmertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0]
        if depth("layer")
        else 4 * hidden_size,
        num_language_layers=depth("layer"),
        num_object_layers=depth("r_layers"),
        num_cross_layers=depth("x_layers"),
        max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
        visual_feature_dim=shape("encoder.visn_fc.visn_fc.weight")[1],
        visual_position_dim=shape("encoder.visn_fc.box_fc.weight")[1],
        num_object_labels=shape("obj_predict_head.decoder_dict.obj.weight")[0],
        num_attribute_labels=shape("obj_predict_head.decoder_dict.attr.weight")[0],
        num_qa_labels=shape("answer_head.logit_fc.3.weight")[0],
    )


# --------------------------------------------------------------------------------------------
# Readers and writers. Each reader returns (lxtrain state dict, config), checked strictly.


def _load_hf_weights(directory: Path) -> StateDict:
    if (directory / WEIGHTS).exists():
        return load_file(directory / WEIGHTS)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        state: StateDict = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(directory / shard))
        return state
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{directory}: no {WEIGHTS}, sharded safetensors or pytorch_model.bin found")


def read_hf(directory: str | Path) -> tuple[StateDict, LxmertConfig]:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: not an HF model directory (no config.json)")
    config = config_from_hf(json.loads(config_path.read_text()))
    weights = _drop_tied_decoder(dict(_load_hf_weights(directory)), str(directory))
    mapping = key_map(config, "lxmert.")
    state = rename(weights, _invert(mapping), str(directory))
    check_state_dict(state, config, str(directory), key_names=mapping)
    return state, config


def write_hf(state: StateDict, config: LxmertConfig, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = rename(state, key_map(config, "lxmert."), "lxtrain state dict")
    save_file({k: v.contiguous() for k, v in weights.items()}, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")


def hf_model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated lxtrain batch as HF ``LxmertForPreTraining``'s input arguments."""
    from lxtrain import batch as B

    return {
        "input_ids": batch[B.INPUT_IDS],
        "visual_feats": batch[B.OBJECT_FEATURES],
        "visual_pos": batch[B.OBJECT_BOXES],
        "attention_mask": batch[B.ATTENTION_MASK],
        "token_type_ids": batch[B.TOKEN_TYPE_IDS],
    }


def hf_pretraining_labels(batch: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """The batch's targets in HF's argument names (its ``loss`` then covers every task). HF's
    ``ans`` is a cross-entropy with PyTorch's default ignore index -100, lxtrain's value too."""
    from lxtrain import batch as B

    return {
        "labels": batch[B.MLM_LABELS],
        "matched_label": batch[B.MATCHED_LABELS],
        "ans": batch[B.QA_LABELS],
        "obj_labels": {
            "obj": (batch[B.OBJECT_LABELS], batch[B.OBJECT_CONFIDENCES]),
            "attr": (batch[B.ATTRIBUTE_LABELS], batch[B.ATTRIBUTE_CONFIDENCES]),
            "feat": (batch[B.FEATURE_TARGETS], batch[B.OBJECT_MASK]),
        },
    }


def read_original(path: str | Path, num_attention_heads: int = 12) -> tuple[StateDict, LxmertConfig]:
    path = Path(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(raw).__name__}")
    # DataParallel saves every key with "module."; the original loader silently loaded nothing
    # when the prefix did not match. Here the prefix is stripped when all keys carry it.
    prefixed = sorted(key for key in raw if key.startswith(DATA_PARALLEL_PREFIX))
    if raw and len(prefixed) == len(raw):
        raw = {key[len(DATA_PARALLEL_PREFIX) :]: tensor for key, tensor in raw.items()}
    elif prefixed:
        raise CheckpointError(
            f"{path}: {len(prefixed)} of {len(raw)} keys carry the DataParallel 'module.' prefix "
            f"(e.g. {prefixed[0]!r}); expected all or none"
        )
    config = infer_config(raw, "bert.", num_attention_heads)
    weights = _drop_tied_decoder(dict(raw), str(path))
    mapping = key_map(config, "bert.")
    state = rename(weights, _invert(mapping), str(path))
    check_state_dict(state, config, str(path), key_names=mapping)
    return state, config


def write_original(state: StateDict, config: LxmertConfig, path: str | Path) -> None:
    """A ``model_LXRT.pth`` keyed as the released one: every key under DataParallel's ``module.``.

    The release's pre-training ``--loadLxmert`` keeps only ``module.``-prefixed keys (it loads
    nothing, silently, from a file without them); its fine-tuning loaders strip the prefix when
    present, so this one layout serves both.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = rename(state, key_map(config, "bert."), "lxtrain state dict")
    weights[TIED_DECODER] = weights["bert.embeddings.word_embeddings.weight"]
    torch.save({DATA_PARALLEL_PREFIX + key: tensor for key, tensor in weights.items()}, path)


def read_lxtrain(directory: str | Path) -> tuple[StateDict, LxmertConfig]:
    directory = Path(directory)
    if not (directory / LXTRAIN_CONFIG).exists():
        raise CheckpointError(f"{directory}: not an lxtrain weights directory (no {LXTRAIN_CONFIG})")
    config = LxmertConfig.load(directory / LXTRAIN_CONFIG)
    state = load_file(directory / WEIGHTS)
    check_state_dict(state, config, str(directory))
    return state, config


def write_lxtrain(state: StateDict, config: LxmertConfig, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    check_state_dict(state, config, "lxtrain state dict")
    save_file({k: v.contiguous() for k, v in state.items()}, directory / WEIGHTS, metadata={"format": "pt"})
    config.save(directory / LXTRAIN_CONFIG)


def read(fmt: str, source: str | Path, num_attention_heads: int = 12) -> tuple[StateDict, LxmertConfig]:
    """Read weights of any format into lxtrain names, checked against the config."""
    if fmt == "hf":
        return read_hf(source)
    if fmt == "original":
        return read_original(source, num_attention_heads)
    if fmt == "lxtrain":
        return read_lxtrain(source)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def write(fmt: str, state: StateDict, config: LxmertConfig, destination: str | Path) -> None:
    writers = {"hf": write_hf, "original": write_original, "lxtrain": write_lxtrain}
    if fmt not in writers:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    writers[fmt](state, config, destination)


def load_model(fmt: str, source: str | Path, num_attention_heads: int = 12):
    """Build an ``LxmertForPretraining`` from weights of any format (strictly checked)."""
    from lxtrain.model.lxmert import LxmertForPretraining

    state, config = read(fmt, source, num_attention_heads)
    model = LxmertForPretraining(config)
    model.load_state_dict(state, strict=True)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lxtrain.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source_format", choices=FORMATS, required=True)
    parser.add_argument("--to", dest="target_format", choices=FORMATS, required=True)
    parser.add_argument(
        "--num-attention-heads",
        type=int,
        default=12,
        help="head count of an 'original' checkpoint (it is not stored in the file; LXMERT-base has 12)",
    )
    parser.add_argument("source", help="source directory (hf, lxtrain) or .pth file (original)")
    parser.add_argument("destination", help="destination directory (hf, lxtrain) or .pth file (original)")
    args = parser.parse_args(argv)
    try:
        state, config = read(args.source_format, args.source, args.num_attention_heads)
        write(args.target_format, state, config, args.destination)
    except (CheckpointError, FileNotFoundError) as error:
        print(f"lxtrain.convert: error: {error}", file=sys.stderr)
        return 2
    count = sum(t.numel() for t in state.values())
    print(
        f"converted {len(state)} tensors ({count / 1e6:.1f}M parameters) {args.source_format} -> {args.target_format}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

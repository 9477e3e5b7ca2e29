"""lxtrain's fused Triton kernels against PyTorch references, and the backend dispatch around them.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
set here before Triton is imported and again around each test, so that other test modules in the
same session see the ordinary environment). With a GPU the same tests run the compiled kernels on
CUDA tensors, and the ``gpu``-marked tests add full LXMERT-size checks. The interpreter is slow:
each parametrisation is a handful of small, representative shapes, not a grid.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
_INTERPRET = "TRITON_INTERPRET"
_previous_interpret = os.environ.get(_INTERPRET)
if not HAS_CUDA:
    os.environ[_INTERPRET] = "1"  # must precede the first `import triton` and the kernels' definitions
try:
    triton = pytest.importorskip(
        "triton", reason="triton is not installed: the fused kernels cannot be tested"
    )
    from lxtrain import kernels
    from lxtrain.kernels import attention_kernels, epilogue_kernels  # noqa: F401 - defines the kernels now
finally:
    if _previous_interpret is None:
        os.environ.pop(_INTERPRET, None)
    else:
        os.environ[_INTERPRET] = _previous_interpret

# torch._dynamo imports Triton: only after the kernels were defined under the interpreter above.
from conftest import build_batch  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402

from lxtrain import batch as B  # noqa: E402
from lxtrain.model import attention as dispatch  # noqa: E402
from lxtrain.model.config import LxmertConfig  # noqa: E402
from lxtrain.model.lxmert import LxmertForPretraining  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# Max error relative to the reference's largest magnitude, per storage dtype of the kernel's inputs.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _kernel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter on (CPU only) and no backend override, for each test of this module alone."""
    if not HAS_CUDA:
        monkeypatch.setenv(_INTERPRET, "1")
    monkeypatch.delenv(dispatch.ENV_OVERRIDE, raising=False)


def _assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    tolerance: float | None = None,
) -> None:
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-3)
    assert error <= (tolerance or TOLERANCE[dtype]) * scale, (
        f"{what}: max error {error:.3g} vs scale {scale:.3g} ({dtype})"
    )


def _heads(batch: int, length: int, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """A (B, H, L, Dh) leaf laid out as the model makes it: a head split of a (B, L, D) projection."""
    hidden = torch.randn(batch, length, heads * head_dim, device=DEVICE).to(dtype)
    return hidden.view(batch, length, heads, head_dim).transpose(1, 2).detach().requires_grad_()


def _padding(batch: int, length: int, dtype: torch.dtype, padded: bool) -> torch.Tensor | None:
    if not padded:
        return None
    mask = torch.ones(batch, length, device=DEVICE)
    for row in range(batch):  # row 0 full, the others shorter: padding of different lengths
        mask[row, max(1, length - 3 * row) :] = 0
    return dispatch.padding_bias(mask, dtype)


def _reference(q, k, v, bias, keep=None, dropout_p=0.0):
    """Attention in fp32 from the same (possibly rounded) inputs; ``keep`` applies a given dropout mask."""
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.float()
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ v.float()


def _check_attention_grads(out, reference, inputs, dtype) -> None:
    upstream = torch.randn_like(reference)
    grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype))
    expected = torch.autograd.grad(reference, inputs, upstream)
    for name, grad, want in zip("qkvqkv", grads, expected, strict=False):
        _assert_close(grad, want, dtype, f"d{name}")


# ---------------------------------------------------------------------------------------------
# Self-attention (one direction): outputs and gradients.

ATTENTION_CASES = [
    # batch, heads, queries, keys, head_dim, padded, dtype
    pytest.param(2, 6, 20, 20, 64, True, torch.float32, id="lxmert-language-self-fp32"),
    pytest.param(2, 2, 36, 20, 64, True, torch.float32, id="objects-over-words-fp32"),
    pytest.param(1, 1, 1, 1, 8, False, torch.float32, id="one-token-fp32"),
    pytest.param(1, 2, 100, 100, 16, False, torch.float32, id="100-objects-fp32"),
    pytest.param(2, 3, 64, 64, 32, True, torch.float32, id="64-tokens-3-heads-fp32"),
    pytest.param(2, 4, 20, 36, 64, True, torch.bfloat16, id="words-over-objects-bf16"),
    pytest.param(3, 2, 17, 17, 24, True, torch.float16, id="odd-sizes-fp16"),
]


@pytest.mark.parametrize(
    ("batch", "heads", "queries", "keys", "head_dim", "padded", "dtype"), ATTENTION_CASES
)
def test_attention_matches_reference(batch, heads, queries, keys, head_dim, padded, dtype) -> None:
    torch.manual_seed(0)
    q = _heads(batch, queries, heads, head_dim, dtype)
    k = _heads(batch, keys, heads, head_dim, dtype)
    v = _heads(batch, keys, heads, head_dim, dtype)
    bias = _padding(batch, keys, dtype, padded)
    out = dispatch.attention(q, k, v, bias, dropout_p=0.0, backend="fused")
    assert out.shape == (batch, heads, queries, head_dim) and out.dtype == dtype
    reference = _reference(q, k, v, bias)
    _assert_close(out, reference, dtype, "output")
    _check_attention_grads(out, reference, [q, k, v], dtype)


def test_attention_row_with_every_key_padded_matches_eager() -> None:
    # A fully padded context (finfo.min on every key) must give eager's uniform weights, not NaN.
    torch.manual_seed(1)
    q, k, v = (_heads(2, 5, 2, 16, torch.float32) for _ in range(3))
    bias = dispatch.padding_bias(torch.tensor([[1.0] * 5, [0.0] * 5], device=DEVICE), torch.float32)
    out = dispatch.attention(q, k, v, bias, dropout_p=0.0, backend="fused")
    eager = dispatch.attention(q, k, v, bias, dropout_p=0.0, backend="eager")
    assert torch.isfinite(out).all()
    _assert_close(out, eager, torch.float32, "output")


# ---------------------------------------------------------------------------------------------
# Bi-directional cross-attention: both directions, one launch.

BIDIRECTIONAL_CASES = [
    pytest.param(1, 12, 20, 36, 64, torch.float32, id="lxmert-fp32"),
    pytest.param(2, 2, 1, 100, 16, torch.float32, id="1-token-100-objects-fp32"),
    pytest.param(1, 3, 64, 1, 32, torch.float32, id="64-tokens-1-object-fp32"),
    pytest.param(2, 2, 20, 36, 64, torch.bfloat16, id="lxmert-bf16"),
    pytest.param(2, 2, 13, 7, 8, torch.float16, id="small-fp16"),
]


@pytest.mark.parametrize(("batch", "heads", "tokens", "objects", "head_dim", "dtype"), BIDIRECTIONAL_CASES)
def test_bidirectional_attention_matches_two_references(
    batch, heads, tokens, objects, head_dim, dtype
) -> None:
    torch.manual_seed(0)
    language = tuple(_heads(batch, tokens, heads, head_dim, dtype) for _ in range(3))
    objects_ = tuple(_heads(batch, objects, heads, head_dim, dtype) for _ in range(3))
    language_bias = _padding(batch, tokens, dtype, padded=True)
    object_bias = _padding(batch, objects, dtype, padded=objects > 1)
    out = dispatch.bidirectional_attention(
        language, objects_, language_bias, object_bias, dropout_p=0.0, backend="fused"
    )
    assert out.shape == (batch, tokens + objects, heads * head_dim) and out.dtype == dtype
    language_out = _reference(language[0], objects_[1], objects_[2], object_bias)
    object_out = _reference(objects_[0], language[1], language[2], language_bias)
    reference = torch.cat([part.transpose(1, 2).flatten(2) for part in (language_out, object_out)], dim=1)
    _assert_close(out, reference, dtype, "output")
    _check_attention_grads(out, reference, [*language, *objects_], dtype)


# ---------------------------------------------------------------------------------------------
# Attention dropout: keep rate, the mask applied consistently forward and backward, seeds.


def _dropout_masks(batch, heads, tokens, objects, dropout_p, seed):
    """The kernel's keep masks of both directions, read out with V = identity (then out = dropped P)."""
    head_dim = 32
    language = [_heads(batch, tokens, heads, head_dim, torch.float32) for _ in range(3)]
    objects_ = [_heads(batch, objects, heads, head_dim, torch.float32) for _ in range(3)]
    for values, length in ((language, tokens), (objects_, objects)):
        identity = torch.zeros(batch, heads, length, head_dim, device=DEVICE)
        identity[..., :length] = torch.eye(length, device=DEVICE)
        values[2] = identity
    out = kernels.attention(
        [language[0], objects_[0]], [objects_[1], language[1]], [objects_[2], language[2]], [None, None],
        dropout_p, seed,
    )  # fmt: skip
    dropped = out.transpose(1, 2)  # (B, H, T + O, Dh)
    return dropped[:, :, :tokens, :objects] > 0, dropped[:, :, tokens:, :tokens] > 0


def test_attention_dropout_keep_rate_and_mask_consistency() -> None:
    torch.manual_seed(0)
    batch, heads, tokens, objects, dropout_p, seed = 2, 4, 24, 12, 0.25, 1234
    language_keep, object_keep = _dropout_masks(batch, heads, tokens, objects, dropout_p, seed)
    kept = torch.cat([language_keep.flatten(), object_keep.flatten()]).float().mean().item()
    assert abs(kept - (1 - dropout_p)) < 0.03, kept  # 4608 draws: 6 standard deviations

    # The same seed on other inputs (with padding) applies those masks, in forward and in backward.
    head_dim = 16
    language = [_heads(batch, tokens, heads, head_dim, torch.float32) for _ in range(3)]
    objects_ = [_heads(batch, objects, heads, head_dim, torch.float32) for _ in range(3)]
    language_bias = _padding(batch, tokens, torch.float32, padded=True)
    out = kernels.attention(
        [language[0], objects_[0]], [objects_[1], language[1]], [objects_[2], language[2]],
        [None, language_bias], dropout_p, seed,
    )  # fmt: skip
    language_out = _reference(language[0], objects_[1], objects_[2], None, language_keep, dropout_p)
    object_out = _reference(objects_[0], language[1], language[2], language_bias, object_keep, dropout_p)
    reference = torch.cat([language_out, object_out], dim=2).transpose(1, 2)
    _assert_close(out, reference, torch.float32, "output with dropout")
    _check_attention_grads(out, reference, [*language, *objects_], torch.float32)


def test_attention_dropout_is_reproducible_from_a_seed() -> None:
    q, k, v = (_heads(1, 8, 2, 16, torch.float32) for _ in range(3))
    run = lambda seed: kernels.attention([q], [k], [v], [None], 0.5, seed)  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    torch.manual_seed(3)  # without an explicit seed, torch's generator decides: manual_seed reproduces
    first = kernels.attention([q], [k], [v], [None], 0.5)
    torch.manual_seed(3)
    assert torch.equal(first, kernels.attention([q], [k], [v], [None], 0.5))


# ---------------------------------------------------------------------------------------------
# Epilogues.

EPILOGUE_CASES = [
    pytest.param((4, 20, 96), torch.float32, id="fp32"),
    pytest.param((2, 36, 768), torch.bfloat16, id="lxmert-width-bf16"),
    pytest.param((3, 5, 40), torch.float16, id="fp16"),
]


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype).requires_grad_()


@pytest.mark.parametrize(("shape", "dtype"), EPILOGUE_CASES)
def test_bias_gelu_matches_reference(shape, dtype) -> None:
    torch.manual_seed(0)
    inputs, bias = _leaf(shape, dtype, 2.0), _leaf(shape[-1:], dtype)
    out = kernels.bias_gelu(inputs, bias)
    reference = F.gelu(inputs.float() + bias.float())  # exact (erf) GELU
    assert out.dtype == dtype
    _assert_close(out, reference, dtype, "output")
    upstream = torch.randn_like(reference)
    grads = torch.autograd.grad(out, [inputs, bias], upstream.to(dtype))
    for name, grad, want in zip(
        ("dx", "dbias"), grads, torch.autograd.grad(reference, [inputs, bias], upstream), strict=False
    ):
        _assert_close(grad, want, dtype, name)


def _layer_norm_reference(inputs, bias, residual, weight, norm_bias, keep=None, dropout_p=0.0):
    hidden = inputs.float() + bias.float()
    if keep is not None:
        hidden = hidden * keep / (1.0 - dropout_p)
    total = hidden + residual.float()
    return F.layer_norm(total, total.shape[-1:], weight.float(), norm_bias.float(), eps=1e-12)


def _check_layer_norm_epilogue(tensors, out, reference, dtype) -> None:
    upstream = torch.randn_like(reference)
    grads = torch.autograd.grad(out, tensors, upstream.to(out.dtype))
    expected = torch.autograd.grad(reference, tensors, upstream)
    for name, grad, want in zip(
        ("dx", "dbias", "dresidual", "dweight", "dnorm_bias"), grads, expected, strict=False
    ):
        assert grad.dtype == dtype
        _assert_close(grad, want, dtype, name)


@pytest.mark.parametrize(("shape", "dtype"), EPILOGUE_CASES)
def test_bias_dropout_residual_layer_norm_matches_reference(shape, dtype) -> None:
    torch.manual_seed(0)
    width = shape[-1]
    tensors = [
        _leaf(shape, dtype),
        _leaf((width,), dtype),
        _leaf(shape, dtype),
        _leaf((width,), dtype),
        _leaf((width,), dtype),
    ]
    out = kernels.bias_dropout_residual_layer_norm(*tensors, 1e-12, 0.0)
    reference = _layer_norm_reference(*tensors)
    assert out.dtype == dtype
    _assert_close(out, reference, dtype, "output")
    _check_layer_norm_epilogue(tensors, out, reference, dtype)


def test_layer_norm_epilogue_dropout_keep_rate_and_consistency() -> None:
    torch.manual_seed(0)
    shape, dropout_p, seed = (24, 96), 0.2, 99
    ones, zeros = torch.ones(shape, device=DEVICE), torch.zeros(shape, device=DEVICE)
    # With inputs + bias = 1 and no residual, kept entries sit above the row mean and dropped ones
    # below it, so the sign of the normalised output reads the mask out.
    probe = kernels.bias_dropout_residual_layer_norm(
        ones, zeros[0], zeros, ones[0], zeros[0], 1e-12, dropout_p, seed
    )
    keep = probe > 0
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.05  # 2304 draws: 6 standard deviations

    tensors = [_leaf(shape, torch.float32) for _ in range(1)]
    tensors += [_leaf(shape[-1:], torch.float32), _leaf(shape, torch.float32)]
    tensors += [_leaf(shape[-1:], torch.float32), _leaf(shape[-1:], torch.float32)]
    out = kernels.bias_dropout_residual_layer_norm(*tensors, 1e-12, dropout_p, seed)
    reference = _layer_norm_reference(*tensors, keep=keep, dropout_p=dropout_p)
    _assert_close(out, reference, torch.float32, "output with dropout")
    _check_layer_norm_epilogue(tensors, out, reference, torch.float32)
    again = kernels.bias_dropout_residual_layer_norm(*tensors, 1e-12, dropout_p, seed)
    assert torch.equal(out, again)


# ---------------------------------------------------------------------------------------------
# The whole network on the fused backend.


def _set_backend(model: LxmertForPretraining, backend: str) -> None:
    dispatch.set_attention_backend(model, backend)


def test_tiny_model_fused_matches_sdpa_with_gradients() -> None:
    config = LxmertConfig.tiny()
    torch.manual_seed(0)
    model = LxmertForPretraining(config).to(DEVICE).eval()  # eval: no dropout, so the paths compare
    batch = build_batch(config, batch_size=2, seq_len=9, num_objects=5)
    inputs = [batch[key].to(DEVICE) for key in B.MODEL_INPUT_KEYS]
    # A fixed random readout: sum(LayerNorm output ** 2) would be a constant, its gradients pure noise.
    readout = {"language": (2, 9, 32), "objects": (2, 5, 32), "pooled": (2, 32)}
    readout = {name: torch.randn(shape, device=DEVICE) for name, shape in readout.items()}
    results = {}
    for backend in ("sdpa", "fused"):
        _set_backend(model, backend)
        model.zero_grad()
        out = model.backbone(*inputs)
        sum((getattr(out, name) * weight).sum() for name, weight in readout.items()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out, grads)
    (sdpa, sdpa_grads), (fused, fused_grads) = results["sdpa"], results["fused"]
    for name in readout:
        torch.testing.assert_close(getattr(fused, name), getattr(sdpa, name), rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == sdpa_grads.keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, sdpa_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_epilogues_kept_exact_run_fused_attention_and_pytorch_epilogues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the engine does under ZeRO-3 for 'auto' (lxtrain.engine.check_attention_backend): the
    # epilogues take the exact path, attention keeps its kernel, and the result matches SDPA.
    config = LxmertConfig.tiny()
    torch.manual_seed(0)
    model = LxmertForPretraining(config).to(DEVICE).eval()
    batch = build_batch(config, batch_size=2, seq_len=9, num_objects=5)
    inputs = [batch[key].to(DEVICE) for key in B.MODEL_INPUT_KEYS]
    with torch.no_grad():
        _set_backend(model, "sdpa")
        reference = model.backbone(*inputs)
        _set_backend(model, "fused")
        dispatch.keep_epilogues_exact(model)
        launches = []
        real_attention = kernels.attention
        monkeypatch.setattr(kernels, "attention", lambda *a: launches.append(1) or real_attention(*a))
        for name in ("bias_gelu", "bias_dropout_residual_layer_norm"):
            monkeypatch.setattr(kernels, name, lambda *a, name=name: pytest.fail(f"{name} ran"))
        out = model.backbone(*inputs)
    assert launches, "attention must still run the fused kernel"
    for name in ("language", "objects", "pooled"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), rtol=1e-5, atol=1e-5)


def test_tiny_model_trains_on_fused_backend_reproducibly() -> None:
    config = LxmertConfig.tiny(num_language_layers=0, num_object_layers=0)
    batch = {
        key: value.to(DEVICE)
        for key, value in build_batch(config, batch_size=2, seq_len=6, num_objects=4).items()
    }

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = LxmertForPretraining(config).to(DEVICE).train()  # dropout on, in every fused kernel
        _set_backend(model, "fused")
        out = model.backbone(*(batch[key] for key in B.MODEL_INPUT_KEYS))
        out.pooled.sum().backward()
        return out.language, model.backbone.cross_layers[0].cross_attention.attention.query.weight.grad

    (language, grad), (language_again, grad_again) = step(), step()
    assert torch.isfinite(language).all() and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(language, language_again) and torch.equal(grad, grad_again)


# ---------------------------------------------------------------------------------------------
# Dispatch.


def test_auto_on_cpu_is_sdpa_even_with_the_interpreter() -> None:
    assert dispatch.resolve_backend("auto", "cpu") == "sdpa"
    assert dispatch.resolve_backend("auto") == "sdpa"
    assert dispatch.resolve_backend("eager", DEVICE) == "eager"


def test_auto_on_a_gpu_is_sdpa_while_the_fused_kernels_measure_slower(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The policy is decided before any availability check, so this holds on a CPU-only machine too.
    monkeypatch.setattr(dispatch, "AUTO_USES_FUSED_KERNELS", False)
    monkeypatch.setattr(dispatch, "_reported", set())
    with caplog.at_level(logging.INFO, logger=dispatch.logger.name):
        assert dispatch.resolve_backend("auto", "cuda") == "sdpa"
    assert "--attention fused" in caplog.text
    monkeypatch.setenv(dispatch.ENV_OVERRIDE, "sdpa")
    assert dispatch.choose_backend("fused") == "sdpa"  # the override still wins


def test_forced_fused_on_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_INTERPRET, raising=False)
    with pytest.raises(RuntimeError, match="'fused'.*not available on cpu.*TRITON_INTERPRET"):
        dispatch.resolve_backend("fused", "cpu")
    monkeypatch.setenv(dispatch.ENV_OVERRIDE, "fused")  # the override forces it too (read at build)
    model = LxmertForPretraining(LxmertConfig.tiny()).eval()
    batch = build_batch(model.config)
    with pytest.raises(RuntimeError, match="'fused'.*not available"), torch.no_grad():
        model.backbone(*(batch[key] for key in B.MODEL_INPUT_KEYS))


def test_fused_without_triton_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_triton_import_error", lambda: "triton is not installed")
    with pytest.raises(RuntimeError, match="'fused'.*triton is not installed"):
        dispatch.resolve_backend("fused", DEVICE)


def test_unsupported_inputs_fall_back_exactly_under_auto_and_fail_when_forced(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "_reported", set())
    q = _heads(1, 4, 2, 8, torch.float32)
    long_keys = _heads(1, kernels.MAX_KEYS + 1, 2, 8, torch.float32)  # beyond one key block
    doubles = [_heads(1, 4, 2, 8, torch.float64) for _ in range(3)]  # an unsupported dtype
    for (query, key), why in (((q, long_keys), "key length"), ((doubles[0], doubles[1]), "dtype")):
        exact = F.scaled_dot_product_attention(query, key, key)
        with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
            for _ in range(3):
                out = dispatch.attention(query, key, key, None, dropout_p=0.0, backend="auto")
                assert torch.equal(out, exact)
        lines = [record.message for record in caplog.records if why in record.message]
        assert len(lines) == 1, lines  # logged once, not per call
        with pytest.raises(RuntimeError, match=f"'fused' cannot run this attention.*{why}"):
            dispatch.attention(query, key, key, None, dropout_p=0.0, backend="fused")


def test_model_imports_and_runs_without_triton() -> None:
    # A fresh interpreter where `import triton` fails: the model must import, run on auto, and
    # refuse a forced 'fused' with the reason; and importing the model must not import triton.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lxtrain.model.config import LxmertConfig\n"
        "from lxtrain.model.lxmert import LxmertForPretraining\n"
        "from lxtrain.model.attention import resolve_backend\n"
        "m = LxmertForPretraining(LxmertConfig.tiny()).eval()\n"
        "ids = torch.tensor([[101, 2000, 102]]); feats = torch.rand(1, 2, 64); boxes = torch.rand(1, 2, 4)\n"
        "m.backbone(ids, torch.ones_like(ids), None, feats, boxes)\n"
        "try:\n    resolve_backend('fused', 'cuda')\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != _INTERPRET}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "triton" in done.stdout
    clean = subprocess.run(
        [sys.executable, "-c", "import sys, lxtrain.model.lxmert; print('triton' in sys.modules)"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert clean.stdout.strip() == "False", clean.stderr


# ---------------------------------------------------------------------------------------------
# torch.compile: every kernel is a custom operator (lxtrain.kernels.ops), so fullgraph compiles.


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's caches emptied around a test, so that no test sees another's compiled graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_case(name: str) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    """A function calling one kernel through lxtrain.kernels' public API, and its leaf inputs (tiny)."""
    if name == "attention-self":
        q, k, v = (_heads(2, 6, 2, 16, torch.float32) for _ in range(3))
        bias = _padding(2, 6, torch.float32, padded=True)
        # An explicit seed: it must reach the graph as a tensor, not break it.
        return lambda q, k, v: kernels.attention([q], [k], [v], [bias], 0.25, seed=7), [q, k, v]
    if name == "attention-both-directions":
        language = [_heads(2, 5, 2, 16, torch.float32) for _ in range(3)]
        objects_ = [_heads(2, 7, 2, 16, torch.float32) for _ in range(3)]
        biases = [_padding(2, 7, torch.float32, padded=True), _padding(2, 5, torch.float32, padded=True)]

        def both(lq, lk, lv, oq, ok, ov):  # drawn seed: dropout as the model runs it
            return kernels.attention([lq, oq], [ok, lk], [ov, lv], biases, 0.25)

        return both, [*language, *objects_]
    if name == "bias-gelu":
        return kernels.bias_gelu, [_leaf((3, 5, 40), torch.float32, 2.0), _leaf((40,), torch.float32)]
    if name == "layer-norm-epilogue":
        leaves = [
            _leaf((3, 5, 40), torch.float32),
            _leaf((40,), torch.float32),
            _leaf((3, 5, 40), torch.float32),
        ]
        leaves += [_leaf((40,), torch.float32), _leaf((40,), torch.float32)]
        return lambda *tensors: kernels.bias_dropout_residual_layer_norm(*tensors, 1e-12, 0.2), leaves
    raise ValueError(name)


def _run_with_grads(fn, leaves: list[torch.Tensor], upstream: torch.Tensor | None, seed: int = 5):
    """fn(*leaves) after torch.manual_seed(seed), and the leaves' gradients for ``upstream``."""
    for leaf in leaves:
        leaf.grad = None
    torch.manual_seed(seed)
    out = fn(*leaves)
    upstream = torch.randn_like(out) if upstream is None else upstream
    out.backward(upstream)
    return out.detach(), [leaf.grad for leaf in leaves], upstream


COMPILE_CASES = ["attention-self", "attention-both-directions", "bias-gelu", "layer-norm-epilogue"]


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_kernel_compiles_fullgraph_and_matches_eager(case: str, fresh_dynamo) -> None:
    torch.manual_seed(0)
    fn, leaves = _compile_case(case)
    explanation = torch._dynamo.explain(fn)(*leaves)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    graph_ops = {str(node.target) for node in explanation.graphs[0].graph.nodes}
    assert any(op.startswith("lxtrain.") for op in graph_ops), graph_ops  # the kernel is one node

    eager, eager_grads, upstream = _run_with_grads(fn, leaves, None)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, grads, _ = _run_with_grads(compiled, leaves, upstream)
    # The same kernels on the same inputs, with the same seeds drawn from the same generator state.
    assert torch.equal(out, eager)
    for leaf_grad, eager_grad in zip(grads, eager_grads, strict=True):
        assert torch.equal(leaf_grad, eager_grad)
    if case in ("attention-both-directions", "layer-norm-epilogue"):
        # Dropout with a drawn seed: another generator state gives other masks, so the equality
        # above also says that the compiled graph drew the seed that eager drew.
        assert not torch.equal(_run_with_grads(compiled, leaves, upstream, seed=6)[0], eager)


def test_compiled_graph_draws_a_fresh_dropout_seed_every_run(fresh_dynamo) -> None:
    torch.manual_seed(0)
    language = [_heads(1, 4, 2, 8, torch.float32) for _ in range(3)]
    objects_ = [_heads(1, 6, 2, 8, torch.float32) for _ in range(3)]
    hidden, bias, weight = (
        _leaf((4, 32), torch.float32),
        _leaf((32,), torch.float32),
        _leaf((32,), torch.float32),
    )

    def step(lq, lk, lv, oq, ok, ov, hidden, bias, weight):
        attended = kernels.attention([lq, oq], [ok, lk], [ov, lv], [None, None], 0.5)
        normed = kernels.bias_dropout_residual_layer_norm(hidden, bias, hidden, weight, bias, 1e-12, 0.5)
        return attended.sum() + (kernels.bias_gelu(normed, bias) * weight).sum()

    graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": []}

    def capture(kind: str):
        def compiler(graph: torch.fx.GraphModule, example_inputs):
            graphs[kind].append(graph)
            return make_boxed_func(graph.forward)

        return compiler

    compiled = torch.compile(
        step,
        fullgraph=True,
        backend=aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward")),
    )
    inputs = [*language, *objects_, hidden, bias, weight]
    first, second = compiled(*inputs), compiled(*inputs)
    assert not torch.equal(first, second)  # a seed baked into the graph would repeat the masks
    torch.manual_seed(11)
    again = compiled(*inputs)
    torch.manual_seed(11)
    assert torch.equal(again, step(*inputs))  # the graph draws as eager draws: manual_seed reproduces
    again.backward()

    # The graphs hold the operators as opaque nodes, forward and backward, and draw the seeds.
    (forward,), (backward,) = graphs["forward"], graphs["backward"]
    forward_ops = {str(node.target) for node in forward.graph.nodes}
    backward_ops = {str(node.target) for node in backward.graph.nodes}
    for name in ("attention", "bias_gelu", "bias_dropout_residual_layer_norm"):
        assert f"lxtrain.{name}.default" in forward_ops, forward_ops
        assert f"lxtrain.{name}_backward.default" in backward_ops, backward_ops
    assert sum(op.startswith("aten.randint") for op in forward_ops) >= 1, forward_ops
    assert len(graphs["forward"]) == 1  # the three calls and manual_seed caused no recompilation


@pytest.mark.slow
def test_tiny_model_training_step_compiles_fullgraph_on_fused_backend(fresh_dynamo) -> None:
    # The whole backbone with dropout on: the dispatch in lxtrain.model.attention and every kernel
    # trace into one graph, and the compiled step (forward and every gradient) equals eager's.
    config = LxmertConfig.tiny()
    torch.manual_seed(0)
    model = LxmertForPretraining(config).to(DEVICE).train()
    _set_backend(model, "fused")
    batch = build_batch(config, batch_size=2, seq_len=6, num_objects=4)
    inputs = [batch[key].to(DEVICE) for key in B.MODEL_INPUT_KEYS]

    def loss(*inputs: torch.Tensor) -> torch.Tensor:
        out = model.backbone(*inputs)
        return (out.language**2).mean() + (out.objects**2).mean() + out.pooled.sum()

    graphs: list[torch.fx.GraphModule] = []

    def recording_aot_eager(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    results = []
    for run in (loss, torch.compile(loss, fullgraph=True, backend=recording_aot_eager)):
        model.zero_grad()
        torch.manual_seed(3)
        value = run(*inputs)
        value.backward()
        results.append(
            (value.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None})
        )
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert len(graphs) == 1
    kernel_calls = [node for node in graphs[0].graph.nodes if str(node.target).startswith("lxtrain.")]
    names = {str(node.target) for node in kernel_calls}
    assert names == {
        "lxtrain.attention.default",
        "lxtrain.bias_gelu.default",
        "lxtrain.bias_dropout_residual_layer_norm.default",
    }, names
    # The cross layer's two directions are one launch: an attention call with a second query.
    assert any(
        str(node.target) == "lxtrain.attention.default" and node.args[4] is not None for node in kernel_calls
    )
    assert torch.equal(compiled, eager)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in compiled_grads.items():
        assert torch.equal(grad, eager_grads[name]), name


def _opcheck_case(name: str) -> tuple[torch._ops.OpOverload, tuple]:
    """(operator, arguments) with small inputs for torch.library.opcheck (built in the test: the
    layer-norm backward's inputs come from a kernel, which runs only under the test's interpreter)."""
    torch.manual_seed(0)
    ops = torch.ops.lxtrain
    seed = torch.tensor(11, dtype=torch.int64)
    lq, lk, lv = (_heads(2, 5, 2, 16, torch.float32) for _ in range(3))
    oq, ok, ov = (_heads(2, 7, 2, 16, torch.float32) for _ in range(3))
    lbias, obias = (_padding(2, n, torch.float32, padded=True) for n in (5, 7))
    both = (lq, ok, ov, obias, oq, lk, lv, lbias, 0.3, seed)
    x, b = _leaf((3, 5, 40), torch.float32), _leaf((40,), torch.float32)
    ln = (x, b, _leaf((3, 5, 40), torch.float32), _leaf((40,), torch.float32), _leaf((40,), torch.float32))
    if name == "attention-both-directions":
        return ops.attention.default, both
    if name == "attention-self-strided-query":
        # A query whose head dimension is not contiguous: the kernels copy it, its gradient is contiguous.
        strided = torch.randn(2, 2, 16, 5, device=DEVICE).transpose(-1, -2).requires_grad_()
        return ops.attention.default, (strided, lk, lv, lbias, None, None, None, None, 0.0, seed)
    if name == "attention-backward":
        detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in both)
        return ops.attention_backward.default, (torch.randn(2, 12, 2, 16, device=DEVICE), *detached)
    if name == "bias-gelu":
        return ops.bias_gelu.default, (x, b)
    if name == "bias-gelu-backward":
        return ops.bias_gelu_backward.default, (torch.randn_like(x), x.detach(), b.detach())
    if name == "layer-norm-epilogue":
        return ops.bias_dropout_residual_layer_norm.default, (*ln, 1e-12, 0.2, seed)
    if name == "layer-norm-epilogue-bf16-fp32":
        # bf16 activations, an fp32 residual and LayerNorm: the output and each gradient keep their dtype.
        mixed = (_leaf((2, 3, 24), torch.bfloat16), _leaf((24,), torch.bfloat16))
        mixed += (_leaf((2, 3, 24), torch.float32), _leaf((24,), torch.float32), _leaf((24,), torch.float32))
        return ops.bias_dropout_residual_layer_norm.default, (*mixed, 1e-5, 0.1, seed)
    if name == "layer-norm-epilogue-backward":
        with torch.no_grad():
            _, total, mean, rstd = ops.bias_dropout_residual_layer_norm(*ln, 1e-12, 0.2, seed)
        dtypes = (torch.float32,) * 4
        args = (torch.randn_like(total), total, mean, rstd, ln[3].detach(), 0.2, seed, *dtypes)
        return ops.bias_dropout_residual_layer_norm_backward.default, args
    raise ValueError(name)


OPCHECK_CASES = [
    "attention-both-directions",
    "attention-self-strided-query",
    "attention-backward",
    "bias-gelu",
    "bias-gelu-backward",
    "layer-norm-epilogue",
    "layer-norm-epilogue-bf16-fp32",
    "layer-norm-epilogue-backward",
]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case: str, fresh_dynamo) -> None:
    # All four checks run under the interpreter: the schema (no mutation, no aliasing), the autograd
    # registration, the fake kernel's shapes, dtypes and strides against the real outputs, and
    # AOT dispatch with dynamic shapes (outputs and gradients equal to eager).
    op, args = _opcheck_case(case)
    results = torch.library.opcheck(op, args)
    checks = {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}
    assert set(results) == checks
    assert set(results.values()) == {"SUCCESS"}, results


def _cpu_compiler_missing() -> bool:
    return DEVICE == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None


@pytest.mark.slow
@pytest.mark.skipif(_cpu_compiler_missing(), reason="inductor on CPU needs a C++ compiler")
def test_inductor_compiles_the_kernels_with_fused_ops_around_them(fresh_dynamo) -> None:
    # Inductor generates code for the ops around the kernels (here C++ on CPU) and calls the
    # operators as opaque kernels, checking their outputs' strides against the fake kernels.
    torch.manual_seed(0)
    language = [_heads(1, 4, 2, 8, torch.float32) for _ in range(3)]
    objects_ = [_heads(1, 6, 2, 8, torch.float32) for _ in range(3)]
    hidden, bias = _leaf((10, 16), torch.float32), _leaf((16,), torch.float32)
    weight, norm_bias = _leaf((16,), torch.float32), _leaf((16,), torch.float32)

    def layer(lq, lk, lv, oq, ok, ov, hidden, bias, weight, norm_bias):
        attended = kernels.attention([lq, oq], [ok, lk], [ov, lv], [None, None], 0.2).flatten(2)
        activated = kernels.bias_gelu(attended.reshape(10, 16) * 0.5, bias)
        return kernels.bias_dropout_residual_layer_norm(
            activated, bias, hidden, weight, norm_bias, 1e-12, 0.2
        )

    leaves = [*language, *objects_, hidden, bias, weight, norm_bias]
    eager, eager_grads, upstream = _run_with_grads(layer, leaves, None)
    # fallback_random: the graph draws the seeds with aten.randint, as eager does, so they compare;
    # inductor's default draws them with its own generator (also fresh on every run).
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(layer, fullgraph=True, backend="inductor")
        out, grads, _ = _run_with_grads(compiled, leaves, upstream)
        assert not torch.equal(compiled(*leaves), out)  # the next run draws new seeds
    _assert_close(out, eager, torch.float32, "output")
    for leaf_grad, eager_grad in zip(grads, eager_grads, strict=True):
        _assert_close(leaf_grad, eager_grad, torch.float32, "gradient")


# ---------------------------------------------------------------------------------------------
# GPU only: full LXMERT shapes and the full-size network.


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [32, 256])
def test_gpu_lxmert_shapes(batch: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    language = tuple(_heads(batch, 20, 12, 64, dtype) for _ in range(3))
    objects_ = tuple(_heads(batch, 36, 12, 64, dtype) for _ in range(3))
    language_bias = _padding(batch, 20, dtype, padded=True)
    out = dispatch.bidirectional_attention(
        language, objects_, language_bias, None, dropout_p=0.0, backend="fused"
    )
    language_out = _reference(language[0], objects_[1], objects_[2], None)
    object_out = _reference(objects_[0], language[1], language[2], language_bias)
    reference = torch.cat([part.transpose(1, 2).flatten(2) for part in (language_out, object_out)], dim=1)
    _assert_close(out, reference, dtype, "output")
    _check_attention_grads(out, reference, [*language, *objects_], dtype)


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_picks_sdpa_and_fused_base_model_agrees_with_sdpa() -> None:
    # auto stays on SDPA while the kernels measure slower (dispatch.AUTO_USES_FUSED_KERNELS).
    assert dispatch.resolve_backend("auto", "cuda") == (
        "auto" if dispatch.AUTO_USES_FUSED_KERNELS else "sdpa"
    )
    config = LxmertConfig()
    torch.manual_seed(0)
    model = LxmertForPretraining(config).cuda().to(torch.bfloat16).eval()
    batch = {
        key: value.cuda()
        for key, value in build_batch(config, batch_size=8, seq_len=20, num_objects=36).items()
    }
    batch[B.OBJECT_FEATURES] = batch[B.OBJECT_FEATURES].bfloat16()
    batch[B.OBJECT_BOXES] = batch[B.OBJECT_BOXES].bfloat16()
    outputs = {}
    for backend in ("sdpa", "fused"):
        _set_backend(model, backend)
        with torch.no_grad():
            outputs[backend] = model.backbone(*(batch[key] for key in B.MODEL_INPUT_KEYS))
    for name in ("language", "objects", "pooled"):
        # Two bf16 implementations through 19 layers: agreement to a few bf16 steps, not one.
        fused, sdpa = getattr(outputs["fused"], name).float(), getattr(outputs["sdpa"], name).float()
        _assert_close(fused, sdpa, torch.bfloat16, name, tolerance=0.1)

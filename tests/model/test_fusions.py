"""The chunked loss, the compiled RMSNorm, Megatron's fused SwiGLU and the recompute options against the
plain path on the tiny VLM (float32: loss and every gradient within 1e-6)."""

from __future__ import annotations

import pytest
import torch

from megatron_v2pe.model.chunked_loss import chunked_cross_entropy
from megatron_v2pe.model.fusions import Fusions
from megatron_v2pe.model.presets import language_transformer_config, tiny
from megatron_v2pe.model.vlm import InternVLModel, model_inputs, weighted_loss
from tests.model.vlm_batches import three_sample_pack

CONFIG = tiny()
TOLERANCE = 1e-6


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_the_float64_formula(chunk):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(53, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 40, (53,), generator=generator)
    upstream = torch.rand(53, generator=generator)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk)
    grads = torch.autograd.grad(loss, (hidden, weight), upstream)

    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    logits = h64 @ w64.t()
    expected = torch.logsumexp(logits, dim=-1) - logits[torch.arange(53), labels]  # written out
    expected_grads = torch.autograd.grad(expected, (h64, w64), upstream.double())
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_masks_the_padded_rows():
    """A slice of 40 rows of which 37 are real ids (the last 3 pad the vocabulary, here not even zero):
    the loss over the 37 real ids (float64 formula), zero gradients on the padded rows."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(29, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 37, (29,), generator=generator)
    loss = chunked_cross_entropy(hidden, weight, labels, 8, real_rows=37)
    grad_hidden, grad_weight = torch.autograd.grad(loss.sum(), (hidden, weight))

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach()[:37].double().requires_grad_(True)
    logits = h64 @ w64.t()
    expected = torch.logsumexp(logits, dim=-1) - logits[torch.arange(29), labels]
    expected_grads = torch.autograd.grad(expected.sum(), (h64, w64))
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad_hidden.double(), expected_grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_weight[:37].double(), expected_grads[1], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(grad_weight[37:]) == 0


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="loss_chunk_tokens must be >= 1"):
        Fusions(loss_chunk_tokens=0)


def _loss_and_grads(fusions: Fusions, state=None, **overrides):
    torch.manual_seed(0)
    language = language_transformer_config(CONFIG, **overrides)
    model = InternVLModel(CONFIG, language, attention_backend="reference", fusions=fusions)
    if state is not None:
        model.load_state_dict(state)
    batch, _ = three_sample_pack(CONFIG)
    numerator, denominator = weighted_loss(model(**model_inputs(batch)), batch.loss_weights)
    loss = numerator / denominator
    loss.backward()
    return model, loss.item(), {n: p.grad for n, p in model.named_parameters()}


VARIANTS = {
    "chunked loss": (Fusions(loss_chunk_tokens=13), {}),
    "compiled norm + fused SwiGLU": (Fusions(compiled_norm=True), dict(bias_activation_fusion=True)),
    "selective recompute": (Fusions(), dict(recompute_granularity="selective",
                                            recompute_modules=["core_attn", "mlp"])),
    "full recompute of one layer": (Fusions(), dict(recompute_granularity="full", recompute_method="block",
                                                    recompute_num_layers=1)),
}


@pytest.mark.usefixtures("megatron_runtime")
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_equals_the_plain_path(variant):
    plain, loss, grads = _loss_and_grads(Fusions())
    fusions, overrides = VARIANTS[variant]
    model, got_loss, got_grads = _loss_and_grads(fusions, plain.state_dict(), **overrides)
    assert loss > 1.0 and abs(got_loss - loss) <= TOLERANCE
    assert got_grads.keys() == grads.keys() and len(grads) > 50
    errors = {n: (got_grads[n] - grads[n]).abs().max().item() for n in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, (worst, errors[worst])
    assert max(g.abs().max().item() for g in grads.values()) > 1e-2  # gradients far from zero

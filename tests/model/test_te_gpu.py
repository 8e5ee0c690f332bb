"""Transformer Engine on the GPU: TE attention on packed V2PE batches against the PyTorch backend, and
short FP8 training runs of the tiny VLM against bf16.

Tolerances (bf16 on both sides, so they bound the distance between two bf16 computations, not to the
exact result): logits within 3e-2 absolute + 3e-2 relative (bf16's step is 2^-8 ≈ 4e-3 relative; two
layers, softmax and the output GEMM add a few steps); each parameter's gradient within 5e-2 of the torch
backend's in relative L2 norm. FP8: every loss finite, each step's loss within 5% of bf16's, and the loss
falling over the run under both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_v2pe.model.language_model import V2PEGPTModel
from megatron_v2pe.model.layer_specs import v2pe_layer_spec
from megatron_v2pe.model.config import internlm2_transformer_config
from megatron_v2pe.model.presets import language_transformer_config, tiny
from megatron_v2pe.model.vlm import InternVLModel, model_inputs, weighted_loss
from megatron_v2pe.optional_deps import is_available
from megatron_v2pe.parallel.fp8 import FP8_RECIPES, fp8_transformer_overrides
from megatron_v2pe.v2pe.positions import compute_positions
from tests.model.te_state import load_into_te, te_state_dict
from tests.model.vlm_batches import pack, sub_sample

HAVE_TE = torch.cuda.is_available() and is_available("transformer_engine")
HAVE_FP8 = HAVE_TE and torch.cuda.get_device_capability() >= (9, 0)
VOCAB, LAYERS, HIDDEN, HEADS, GROUPS, FFN = 128, 2, 128, 4, 2, 256

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("megatron_runtime")]


def _model(backend: str) -> V2PEGPTModel:
    torch.manual_seed(7)
    config = internlm2_transformer_config(LAYERS, HIDDEN, HEADS, GROUPS, FFN, params_dtype=torch.bfloat16)
    return V2PEGPTModel(config, v2pe_layer_spec(backend), VOCAB, 8192, share_embeddings_and_output_weights=False)


def _packed_v2pe_batch(device: str):
    """Three sub-samples (one shorter than a TE tile), each text / image (δ = 1/4, 1/16) / text."""
    from megatron.core.packed_seq_params import PackedSeqParams

    rng = np.random.default_rng(4)
    lengths = [96, 13, 160]
    positions = []
    for n in lengths:
        visual = np.zeros(n, dtype=bool)
        visual[2 : 2 + n // 3] = True
        visual[n // 2 + 1 : n - 2] = True
        positions.append(compute_positions(visual, np.array([0.25, 1 / 16])))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    ids = torch.from_numpy(rng.integers(0, VOCAB, sum(lengths))).to(device)[None]
    return ids, torch.from_numpy(np.concatenate(positions)).to(device)[None], params


def _logits_and_grads(model, batch):
    ids, positions, params = batch
    logits = model(ids, None, positions=positions, packed_seq_params=params)
    upstream = torch.randn(logits.shape, generator=torch.Generator(logits.device).manual_seed(0),
                           device=logits.device, dtype=logits.dtype)
    (logits.float() * upstream.float()).sum().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def compare_backends(backend: str, baseline: str = "torch", device: str = "cuda") -> None:
    """Logits and every gradient of ``backend`` against ``baseline`` on a packed V2PE batch."""
    expected_model = _model(baseline).to(device)
    model = _model(backend).to(device)
    if backend == "te":
        load_into_te(model, expected_model)
    else:
        model.load_state_dict(expected_model.state_dict())
    batch = _packed_v2pe_batch(device)
    expected, expected_grads = _logits_and_grads(expected_model, batch)
    got, grads = _logits_and_grads(model, batch)
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
    if backend == "te":
        expected_grads = te_state_dict(expected_grads)
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        reference = expected_grads[name]
        error = (grad - reference).norm() / reference.norm()
        assert error <= 5e-2, (name, error.item())


@pytest.mark.skipif(not HAVE_TE, reason="needs a CUDA GPU with Transformer Engine")
def test_te_attention_on_packed_v2pe_batch_equals_torch_backend():
    compare_backends("te")


def _losses(recipe: str | None, steps: int = 6) -> list[float]:
    """Losses of ``steps`` Adam steps of the tiny VLM on one packed batch, TE layers, bf16 or FP8."""
    from megatron.core.fp8_utils import get_fp8_context

    config = tiny()
    language = language_transformer_config(config, bf16=True, params_dtype=torch.bfloat16,
                                           **fp8_transformer_overrides(recipe))
    torch.manual_seed(0)
    model = InternVLModel(config, language, attention_backend="te").cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    batch = pack([sub_sample(config, rng, [30, ("image", 1, 0.25), 20]) for _ in range(2)], pad_multiple=32)
    batch = batch.to("cuda")
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with get_fp8_context(language):
            numerator, denominator = weighted_loss(model(**model_inputs(batch)), batch.loss_weights)
        loss = numerator / denominator
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(not HAVE_FP8, reason="needs Transformer Engine and a Hopper GPU")
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_training_tracks_bf16(recipe):
    bf16, fp8 = _losses(None), _losses(recipe)
    assert all(np.isfinite(fp8)), fp8
    assert fp8[-1] < fp8[0] and bf16[-1] < bf16[0], (bf16, fp8)
    np.testing.assert_allclose(fp8, bf16, rtol=5e-2)

"""The V2PE GPTModel: parity with stock Megatron-Core rope, with packing, and with a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_v2pe.model.config import internlm2_transformer_config
from megatron_v2pe.model.language_model import V2PEGPTModel
from megatron_v2pe.model.layer_specs import v2pe_layer_spec
from megatron_v2pe.optional_deps import is_available
from megatron_v2pe.v2pe.positions import compute_positions
from megatron_v2pe.v2pe.rotary import DynamicNTK
from tests.model.reference_lm import reference_logits
from tests.model.te_state import load_into_te

VOCAB, LAYERS, HIDDEN, HEADS, GROUPS, FFN, THETA = 96, 2, 64, 4, 2, 160, 1e6

pytestmark = pytest.mark.usefixtures("megatron_runtime")


def _config():
    return internlm2_transformer_config(LAYERS, HIDDEN, HEADS, GROUPS, FFN)


def _v2pe_model(backend: str = "reference") -> V2PEGPTModel:
    torch.manual_seed(7)
    model = V2PEGPTModel(
        _config(), v2pe_layer_spec(backend), VOCAB, 4096,
        rotary_base=THETA, share_embeddings_and_output_weights=False,
    )
    return model.eval()


def _thd(cu_seqlens: list[int]) -> PackedSeqParams:
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _v2pe_sample(rng: np.random.Generator, seq: int, deltas=(0.25, 1 / 256)) -> np.ndarray:
    """Positions of a text/image/text/image/text sequence with the given δ per image."""
    mask = np.zeros(seq, dtype=bool)
    mask[3 : 3 + seq // 3] = True
    mask[seq // 2 + 2 : seq - 3] = True
    return compute_positions(mask, np.array(deltas))


def test_integer_positions_reproduce_stock_rope():
    model = _v2pe_model()
    stock = GPTModel(_config(), get_gpt_layer_local_spec(normalization="RMSNorm"), VOCAB, 4096,
                     position_embedding_type="rope", rotary_base=THETA,
                     share_embeddings_and_output_weights=False).eval()
    stock.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(48).expand(2, 48)
    with torch.no_grad():
        expected = stock(ids, position_ids, None)
        got = model(ids, None, positions=position_ids.to(torch.float64))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 2.0**20])
def test_fractional_positions_match_float64_reference(offset):
    """Whole-model logits against an independent float64 implementation, also near position 1M."""
    model = _v2pe_model()
    rng = np.random.default_rng(1)
    positions = _v2pe_sample(rng, 40) + offset
    ids = torch.from_numpy(rng.integers(0, VOCAB, size=40))
    with torch.no_grad():
        got = model(ids[None], None, positions=torch.from_numpy(positions)[None])[0]
    expected = reference_logits(model.state_dict(), ids, positions, num_layers=LAYERS,
                                num_heads=HEADS, num_groups=GROUPS, theta=THETA)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)


def test_packed_thd_equals_each_sequence_alone():
    model = _v2pe_model()
    rng = np.random.default_rng(2)
    lengths = [30, 17, 45]
    samples = [(torch.from_numpy(rng.integers(0, VOCAB, n)), _v2pe_sample(rng, n)) for n in lengths]
    ids = torch.cat([s[0] for s in samples])[None]
    positions = torch.from_numpy(np.concatenate([s[1] for s in samples]))[None]
    with torch.no_grad():
        packed = model(ids, None, positions=positions, packed_seq_params=_thd([0, 30, 47, 92]))
        alone = [model(i[None], None, positions=torch.from_numpy(p)[None]) for i, p in samples]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=1e-5, rtol=1e-5)


def test_dynamic_ntk_logits_past_the_window_and_per_sequence_in_a_pack():
    """δ = 1 past a window of 32 with factor 2: a 40-token sequence gives the float64 reference's logits at
    θ·(2·40/32 − 1)^(d/(d−2)); packed with a 20-token one (inside the window: plain θ), each is as alone.
    θ = 100, so that the scaling shows in 40 positions."""
    BASE = 100.0  # noqa: N806
    torch.manual_seed(7)
    model = V2PEGPTModel(
        _config(), v2pe_layer_spec("reference"), VOCAB, 4096, rotary_base=BASE,
        dynamic_ntk=DynamicNTK(2.0, 32), share_embeddings_and_output_weights=False,
    ).eval()
    head_dim = HIDDEN // HEADS
    rng = np.random.default_rng(4)
    samples = [(torch.from_numpy(rng.integers(0, VOCAB, n)), np.arange(n, dtype=np.float64)) for n in (40, 20)]
    with torch.no_grad():
        alone = [model(i[None], None, positions=torch.from_numpy(p)[None])[0] for i, p in samples]
        packed = model(
            torch.cat([i for i, _ in samples])[None], None, packed_seq_params=_thd([0, 40, 60]),
            positions=torch.from_numpy(np.concatenate([p for _, p in samples]))[None],
        )[0]
    scaled = BASE * (2.0 * 40 / 32 - 1) ** (head_dim / (head_dim - 2))
    for (ids, positions), got, theta in zip(samples, alone, (scaled, BASE)):
        expected = reference_logits(model.state_dict(), ids, positions, num_layers=LAYERS,
                                    num_heads=HEADS, num_groups=GROUPS, theta=theta)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    plain = reference_logits(model.state_dict(), *samples[0], num_layers=LAYERS, num_heads=HEADS,
                             num_groups=GROUPS, theta=BASE)
    assert (plain - alone[0].double()).abs().max() > 2e-4  # the scaling shows: 10x the tolerance


def test_positions_change_the_output():
    """Guards the wiring: if angles were dropped, fractional and integer positions would agree."""
    model = _v2pe_model()
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(3))
    integer = torch.arange(32, dtype=torch.float64)[None]
    with torch.no_grad():
        a = model(ids, None, positions=integer)
        b = model(ids, None, positions=integer * 0.25)
    assert (a - b).abs().max() > 1e-3


def test_layer_spec_without_v2pe_attention_is_rejected():
    with pytest.raises(ValueError, match="V2PESelfAttention"):
        V2PEGPTModel(_config(), get_gpt_layer_local_spec(normalization="RMSNorm"), VOCAB, 64)


def test_te_backend_without_transformer_engine_says_what_is_missing():
    if is_available("transformer_engine"):
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ImportError, match="transformer-engine"):
        v2pe_layer_spec("te")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not is_available("transformer_engine"),
                    reason="needs a CUDA GPU with Transformer Engine")
def test_te_spec_matches_reference_spec_on_gpu():
    reference = _v2pe_model("reference").cuda()
    te_model = _v2pe_model("te").cuda()
    load_into_te(te_model, reference)
    rng = np.random.default_rng(4)
    lengths = [64, 48]
    ids = torch.from_numpy(rng.integers(0, VOCAB, sum(lengths))).cuda()[None]
    positions = torch.from_numpy(np.concatenate([_v2pe_sample(rng, n) for n in lengths])).cuda()[None]
    params = _thd([0, 64, 112])
    params.cu_seqlens_q, params.cu_seqlens_kv = params.cu_seqlens_q.cuda(), params.cu_seqlens_kv.cuda()
    with torch.no_grad():
        expected = reference(ids, None, positions=positions, packed_seq_params=params)
        got = te_model(ids, None, positions=positions, packed_seq_params=params)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)

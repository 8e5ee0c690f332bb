"""The InternVL2 + V2PE model on packed image-text batches."""

from __future__ import annotations


import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_v2pe.model.flops import language_forward_flops, projector_forward_flops, vision_forward_flops
from megatron_v2pe.model.presets import internvl2_2b, language_transformer_config, tiny
from megatron_v2pe.model.vlm import InternVLModel, model_inputs, weighted_loss
from tests.model.vlm_batches import three_sample_pack

pytestmark = pytest.mark.usefixtures("megatron_runtime")

CONFIG = tiny()


def _model(backend: str = "reference", seed: int = 0, **overrides) -> InternVLModel:
    torch.manual_seed(seed)
    return InternVLModel(CONFIG, language_transformer_config(CONFIG, **overrides), attention_backend=backend)


def _loss(model, batch):
    numerator, denominator = weighted_loss(model(**model_inputs(batch)), batch.loss_weights)
    return numerator / denominator


def test_forward_backward_reaches_every_parameter():
    model = _model()
    batch, _ = three_sample_pack(CONFIG)
    loss = _loss(model, batch)
    assert torch.isfinite(loss) and loss > 1.0
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("frozen", ["vision", "projector", "language"])
def test_frozen_parts_get_no_gradient(frozen):
    model = _model()
    model.freeze(**{frozen: True})
    _loss(model, three_sample_pack(CONFIG)[0]).backward()
    prefix = {"vision": "vision_model.", "projector": "vision_projection.", "language": "language_model."}[frozen]
    for name, param in model.named_parameters():
        assert (param.grad is None) == name.startswith(prefix), name


def test_pack_equals_each_sub_sample_alone():
    model = _model().eval()
    pack, alone = three_sample_pack(CONFIG)
    with torch.no_grad():
        packed = model(**model_inputs(pack))
        separate = torch.cat([model(**model_inputs(b)) for b in alone], dim=1)
    weighted = pack.loss_weights > 0
    torch.testing.assert_close(packed[0, weighted], separate[0, weighted], atol=1e-5, rtol=1e-5)


def test_image_features_land_in_their_slots_in_order():
    model = _model().eval()
    batch, _ = three_sample_pack(CONFIG)
    hidden = CONFIG.language.hidden_size
    planted = torch.arange(int(batch.tiles_per_image.sum()) * CONFIG.tokens_per_tile, dtype=torch.float32)
    planted = planted[:, None] + torch.linspace(0, 0.5, hidden)[None]  # row i is unmistakably i
    model.encode_images = lambda pixels: planted
    seen = {}
    model.language_model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=kwargs["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**model_inputs(batch))
    decoder_input = seen["hidden"][:, 0]
    slots = batch.tokens == CONFIG.img_context_token_id
    torch.testing.assert_close(decoder_input[slots], planted)
    text_embeddings = model.language_model.embedding.word_embeddings.weight[batch.tokens[~slots]]
    torch.testing.assert_close(decoder_input[~slots], text_embeddings)


def test_slot_and_feature_count_mismatch_names_both_counts():
    model = _model()
    batch, _ = three_sample_pack(CONFIG)
    inputs = model_inputs(batch)
    inputs["pixel_values"] = inputs["pixel_values"][:-1]
    slots = int((batch.tokens == CONFIG.img_context_token_id).sum())
    features = (batch.pixel_values.shape[0] - 1) * CONFIG.tokens_per_tile
    with pytest.raises(ValueError, match=rf"{slots} <IMG_CONTEXT> slots .* {features} image features"):
        model(**inputs)


def test_activation_recompute_changes_nothing():
    batch, _ = three_sample_pack(CONFIG)
    results = []
    for recompute in (dict(), dict(recompute_granularity="full", recompute_method="uniform",
                                   recompute_num_layers=1)):
        model = _model(seed=3, **recompute)
        loss = _loss(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=0, rtol=0, msg=name)


def test_attention_backends_agree_on_a_packed_batch():
    batch, _ = three_sample_pack(CONFIG)
    reference = _model("reference").eval()
    other = _model("torch").eval()
    other.load_state_dict(reference.state_dict())
    with torch.no_grad():
        expected = reference(**model_inputs(batch))
        got = other(**model_inputs(batch))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_weighted_loss_is_sum_w_ce_over_sum_w():
    per_token = torch.tensor([[2.0, 3.0, 5.0, 7.0]])
    weights = torch.tensor([0.5, 0.0, 1.0, 0.25])
    numerator, denominator = weighted_loss(per_token, weights)
    assert numerator.item() == pytest.approx(2 * 0.5 + 5 + 7 * 0.25)
    assert denominator.item() == pytest.approx(1.75)


def _internvl2_2b_hf_parameter_count() -> int:
    """From the shapes of OpenGVLab/InternVL2-2B's tensors (InternViT-300M, mlp1, InternLM2-1.8B)."""
    vit_h, vit_ffn, vit_layers, patches = 1024, 4096, 24, (448 // 14) ** 2
    vit = 3 * 14 * 14 * vit_h + vit_h + vit_h + (patches + 1) * vit_h  # patch conv w+b, cls, pos
    vit += vit_layers * (
        2 * 2 * vit_h  # norm1, norm2 (weight + bias)
        + vit_h * 3 * vit_h + 3 * vit_h  # qkv
        + vit_h * vit_h + vit_h  # proj
        + vit_h * vit_ffn + vit_ffn + vit_ffn * vit_h + vit_h  # fc1, fc2
        + 2 * vit_h  # ls1, ls2
    )
    lm_h, ffn, layers, vocab, kv_heads, head_dim = 2048, 8192, 24, 92553, 8, 128
    mlp1 = 2 * 4 * vit_h + 4 * vit_h * lm_h + lm_h + lm_h * lm_h + lm_h
    lm = 2 * vocab * lm_h + lm_h  # tok_embeddings, output, final norm
    lm += layers * (
        2 * lm_h  # attention_norm, ffn_norm
        + lm_h * (lm_h + 2 * kv_heads * head_dim)  # wqkv
        + lm_h * lm_h  # wo
        + 3 * lm_h * ffn  # w1, w3, w2
    )
    return vit + mlp1 + lm


def test_internvl2_2b_preset_has_the_published_parameter_count():
    config = internvl2_2b()
    with torch.device("meta"):
        model = InternVLModel(config, language_transformer_config(config), attention_backend="reference")
    count = sum(p.numel() for p in model.parameters())
    assert count == _internvl2_2b_hf_parameter_count()
    assert round(count / 1e9, 2) == 2.21  # as published


def test_matmul_flops_match_a_flop_counter():
    """The formula's matmul terms against torch's FlopCounterMode on one forward (attention excluded:
    the reference backend computes it densely, the formula counts what causal kernels compute)."""
    model = _model().eval()
    batch, _ = three_sample_pack(CONFIG)
    seqlens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    tiles = batch.pixel_values.shape[0]
    counter = FlopCounterMode(display=False)
    with counter:
        model(**model_inputs(batch))
    counted = sum(flops for op, flops in counter.get_flop_counts()["Global"].items()
                  if "scaled_dot_product" not in str(op))
    lm, vit = CONFIG.language, CONFIG.vision
    lm_attention = 2 * 2 * lm.hidden_size * sum(n * (n + 1) / 2 for n in seqlens) * lm.num_layers
    vit_attention = 2 * 2 * vit.hidden_size * (vit.num_patches + 1) ** 2 * vit.num_layers * tiles
    formula = (language_forward_flops(CONFIG, seqlens) - lm_attention
               + vision_forward_flops(CONFIG, tiles) - vit_attention
               + projector_forward_flops(CONFIG, tiles))
    assert formula == pytest.approx(counted, rel=1e-9)

"""Zero-padded attention heads (InternViT-6B's 25 at TP 8: ``model/tp_padding.py``) change nothing. A
tiny InternViT-6B-style tower of 5 heads built with 6 (one zero head, as TP 2 pads it) gives transformers'
``InternVLVisionModel`` features and input gradients, and the unpadded tower's weight gradients, while
its padding gets zero gradients. The split rules pad each rank's piece and strip back bit-identically."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_v2pe.convert import LAYOUTS
from megatron_v2pe.convert.checkpoint import build_model, load_hf_weights, table
from megatron_v2pe.convert.mapping import Padded
from megatron_v2pe.convert.safetensors_io import SafetensorsSource
from megatron_v2pe.model.presets import vision_transformer_config
from megatron_v2pe.model.vision import InternViTModel, vision_layer_spec
from tests.convert.tiny_models import family_config, hf_native_model

pytestmark = pytest.mark.usefixtures("megatron_runtime")

HEAD_DIM = 16
PADDED_DIM = {"linear_qkv.weight": 0, "linear_proj.weight": 1, "q_norm.weight": 0, "k_norm.weight": 0}
"""Where each per-head tensor holds its heads; the fused qkv holds [q | k | v] of one head after another."""


def _per_head(name: str) -> tuple[int, int] | None:
    """(dimension, width of one head) of a per-head tensor; None for the others."""
    suffix = next((s for s in PADDED_DIM if name.endswith(s)), None)
    if suffix is None:
        return None
    return PADDED_DIM[suffix], HEAD_DIM * (3 if suffix == "linear_qkv.weight" else 1)


def _pad(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with one zero head appended."""
    if _per_head(name) is None:
        return tensor
    dim, width = _per_head(name)
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor, torch.zeros(shape)], dim=dim)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """(transformers' model, our unpadded tower, our padded tower with the same weights)."""
    hf = hf_native_model(family="qwen2", tower="6b_odd")
    directory = tmp_path_factory.mktemp("odd_heads")
    hf.save_pretrained(directory)
    config = LAYOUTS["hf"].read_config(json.loads((directory / "config.json").read_text()))
    assert config.vision.num_attention_heads == 5
    unpadded = build_model(config, torch.float32, "reference")
    load_hf_weights(unpadded, SafetensorsSource(directory), LAYOUTS["hf"], config)
    six_heads = dataclasses.replace(
        vision_transformer_config(config), num_attention_heads=6, num_query_groups=6
    )
    padded = InternViTModel(config.vision, six_heads, vision_layer_spec("reference", config.vision))
    padded.load_state_dict({k: _pad(k, v) for k, v in unpadded.vision_model.state_dict().items()})
    return hf, unpadded.vision_model, padded


def _features_and_grads(forward, pixels: torch.Tensor, probe: torch.Tensor):
    """Features, and the input gradient of their dot product with ``probe``."""
    pixels = pixels.clone().requires_grad_()
    features = forward(pixels)
    (features * probe).sum().backward()
    return features.detach(), pixels.grad


def test_padded_tower_gives_transformers_features_and_input_gradients(towers):
    hf, _, padded = towers
    vision = hf.model.vision_tower.float()
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randn(3, 3, 56, 56, generator=generator)
    probe = torch.randn(3, 16, 80, generator=generator)
    expected, expected_grad = _features_and_grads(
        lambda p: vision(pixel_values=p).last_hidden_state[:, 1:], pixels, probe
    )
    found, found_grad = _features_and_grads(padded, pixels, probe)
    assert found.abs().max() > 0.1
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_padded_tower_gives_the_unpadded_weight_gradients_and_none_to_its_padding(towers):
    _, unpadded, padded = towers
    generator = torch.Generator().manual_seed(6)
    pixels = torch.randn(2, 3, 56, 56, generator=generator)
    probe = torch.randn(2, 16, 80, generator=generator)
    for tower in (unpadded, padded):
        tower.zero_grad()
        _features_and_grads(tower, pixels, probe)
    reference = dict(unpadded.named_parameters())
    for name, param in padded.named_parameters():
        if not param.requires_grad:
            continue
        expected = reference[name].grad
        if _per_head(name) is not None:
            dim, width = _per_head(name)
            assert torch.count_nonzero(param.grad.narrow(dim, expected.shape[dim], width)) == 0, name
            expected = _pad(name, expected)
        torch.testing.assert_close(param.grad, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("size", [2, 4])
def test_split_rules_pad_each_ranks_piece_and_strip_back_bit_identically(tmp_path, size):
    config = family_config("qwen2", "6b_odd")
    hf_native_model(family="qwen2", tower="6b_odd").save_pretrained(tmp_path)
    hf = load_file(tmp_path / "model.safetensors")
    entries = [e for e in table(LAYOUTS["hf"], config) if e.megatron.startswith("vision_model.")]
    padded_entries = [e for e in entries if isinstance(e.split, Padded)]
    assert len(padded_entries) == 4 * config.vision.num_layers  # qkv, proj, q and k norms
    for e in padded_entries:
        whole = e.transform.to_megatron([hf[name] for name in e.hf])
        pieces = [e.split.shard(whole, rank, size) for rank in range(size)]
        dim, heads = e.split.value, config.vision.num_attention_heads
        assert e.split.whole_shape(pieces[0].shape, size) == whole.shape
        joined = torch.cat(pieces, dim=dim)
        real = whole.shape[dim]
        assert joined.shape[dim] == real // heads * -(-heads // size) * size
        assert torch.count_nonzero(joined.narrow(dim, real, joined.shape[dim] - real)) == 0
        stripped = joined.narrow(dim, 0, real)
        for name, tensor in zip(e.hf, e.transform.to_hf(stripped), strict=True):
            assert torch.equal(tensor, hf[name]), name

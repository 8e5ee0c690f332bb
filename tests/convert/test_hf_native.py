"""transformers' own InternVL -> our model: the same logits, with integer and with V2PE positions, for the
text model of every language family (Llama as InternLM2 and Llama-3, Qwen2 tied with biases, Qwen3 tied
with q/k norms) and both vision towers (InternViT-300M; InternViT-6B's RMSNorm, no qkv bias, cross-head
q/k norms)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_v2pe.checkpoint.model_only import build_model
from megatron_v2pe.convert import LAYOUTS
from megatron_v2pe.convert.checkpoint import load_hf_weights
from megatron_v2pe.convert.hf_positions import use_float64_rotary, v2pe_inputs
from megatron_v2pe.convert.safetensors_io import SafetensorsSource
from megatron_v2pe.model.vlm import InternVLModel
from tests.convert.tiny_models import CONFIG, FAMILIES, family_config, hf_native_model
from tests.model.vlm_batches import pack, sub_sample

pytestmark = pytest.mark.usefixtures("megatron_runtime")

LAYOUT = LAYOUTS["hf"]


CASES = [(family, "300m") for family in FAMILIES] + [
    ("llama", "6b"), ("qwen2", "6b"), ("qwen2_odd_vocab", "300m"),
]
"""(language family, vision tower): every family on InternViT-300M, InternViT-6B's normalisation under
InternLM2 (InternVL2.5-26B) and Qwen2.5 (InternVL3-78B), and an odd vocabulary that TP pads (TP 2 gives
the single-process loss and gradients: tests/parallel/test_vlm_layouts.py)."""


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def converted(request, tmp_path_factory):
    """(the transformers model, our model loaded from its save_pretrained directory, the case)."""
    hf = hf_native_model(family=request.param[0], tower=request.param[1])
    directory = tmp_path_factory.mktemp("hf_native")
    hf.save_pretrained(directory)
    config = LAYOUT.read_config(json.loads((directory / "config.json").read_text()))
    ours = build_model(config, torch.float32, "reference").eval()
    load_hf_weights(ours, SafetensorsSource(directory), LAYOUT, config)
    return hf, ours, request.param


def _batch(deltas: tuple[float, float]):
    rng = np.random.default_rng(1)
    return pack([sub_sample(CONFIG, rng, [5, ("image", 2, deltas[0]), 7, ("image", 1, deltas[1]), 4])])


def _our_logits(model: InternVLModel, batch) -> torch.Tensor:
    return _logits(model, batch.tokens, batch.positions, batch.pixel_values)


def _logits(model: InternVLModel, tokens: torch.Tensor, positions: torch.Tensor, pixels: torch.Tensor):
    """One unpacked sequence (plain causal attention)."""
    with torch.no_grad():
        return model(input_ids=tokens[None], positions=positions[None], pixel_values=pixels).reshape(
            len(tokens), -1
        )


def _hf_logits(model, batch, position_ids: torch.Tensor | None) -> torch.Tensor:
    inputs = {
        "input_ids": batch.tokens[None],
        "pixel_values": batch.pixel_values,
        "attention_mask": torch.ones_like(batch.tokens[None]),
    }
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    with torch.no_grad():
        return model(**inputs).logits[0]


def test_config_reads_as_the_family_preset(converted):
    hf, _, case = converted
    config, expected = LAYOUT.read_config(hf.config.to_dict()), family_config(*case)
    assert config == expected and config.language.family == expected.language.family


def test_integer_positions_give_transformers_logits(converted):
    hf, ours, _ = converted
    batch = _batch((1.0, 1.0))
    assert torch.equal(batch.positions, torch.arange(len(batch.tokens), dtype=torch.float64))
    torch.testing.assert_close(_our_logits(ours, batch), _hf_logits(hf, batch, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("float64_rotary", [False, True], ids=["stock_rotary", "float64_rotary"])
def test_v2pe_positions_give_transformers_logits(converted, float64_rotary):
    hf, ours, case = converted
    batch = _batch((0.25, 1 / 256))
    assert batch.positions[-1] < len(batch.tokens) - 10  # the fractional steps are really there
    if float64_rotary:
        hf = hf_native_model(family=case[0], tower=case[1])
        use_float64_rotary(hf)
    torch.testing.assert_close(
        _our_logits(ours, batch), _hf_logits(hf, batch, batch.positions[None]), atol=1e-5, rtol=1e-5
    )


def test_v2pe_inputs_build_the_positions_of_our_data_pipeline(converted):
    hf, _, _ = converted
    batch = _batch((0.25, 0.25))
    inputs = v2pe_inputs(hf, batch.tokens[None], delta_policy="fixed:1/4")
    assert torch.equal(inputs["position_ids"][0], batch.positions)
    assert torch.equal(inputs["attention_mask"], torch.ones_like(batch.tokens[None]))


def _our_greedy(model: InternVLModel, batch, steps: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence; the k-th new token sits at last position + k."""
    tokens, positions = batch.tokens, batch.positions
    for _ in range(steps):
        next_token = _logits(model, tokens, positions, batch.pixel_values)[-1].argmax()
        tokens = torch.cat([tokens, next_token[None]])
        positions = torch.cat([positions, positions[-1:] + 1])
    return tokens[len(batch.tokens) :].tolist()


def test_greedy_generate_with_v2pe_inputs_equals_our_generation(converted):
    hf, ours, _ = converted
    batch = _batch((0.25, 0.25))
    hf.generation_config.eos_token_id = None  # tiny vocabularies have no real end token
    prompt = batch.tokens[None]
    with torch.no_grad():
        generated = hf.generate(
            prompt,
            pixel_values=batch.pixel_values,
            max_new_tokens=6,
            do_sample=False,
            **v2pe_inputs(hf, prompt, delta_policy="fixed:1/4"),
        )
    assert generated[0, prompt.shape[1] :].tolist() == _our_greedy(ours, batch, 6)

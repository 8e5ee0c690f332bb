"""FP8 selection: clear refusals where it cannot run, a real FP8 step where it can."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_v2pe.data.packing import padding_multiple
from megatron_v2pe.model.presets import language_transformer_config, tiny
from megatron_v2pe.model.vlm import InternVLModel, model_inputs, weighted_loss
from megatron_v2pe.optional_deps import is_available
from megatron_v2pe.parallel.fp8 import FP8_RECIPES, fp8_transformer_overrides
from tests.model.vlm_batches import pack, sub_sample

HAVE_FP8 = (
    torch.cuda.is_available() and is_available("transformer_engine")
    and torch.cuda.get_device_capability() >= (9, 0)
)


def test_no_recipe_means_no_fp8():
    assert fp8_transformer_overrides(None) == {}


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(ValueError, match="delayed"):
        fp8_transformer_overrides("e5m2-magic")


@pytest.mark.skipif(HAVE_FP8, reason="this machine can run FP8")
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_without_te_or_hopper_says_what_is_missing(recipe):
    expected = (ImportError, RuntimeError)
    with pytest.raises(expected, match="transformer-engine|CUDA GPU|Hopper"):
        fp8_transformer_overrides(recipe)


def test_fp8_padding_keeps_every_rank_share_a_multiple_of_16():
    for cp in (1, 2, 4, 8):
        for tp, sp in ((1, False), (2, True), (4, True)):
            multiple = padding_multiple(cp=cp, tp=tp, sequence_parallel=sp, fp8=True)
            assert (multiple // (cp * (tp if sp else 1))) % 16 == 0
            assert multiple % (2 * cp) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_FP8, reason="needs Transformer Engine and a Hopper GPU")
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_training_step_on_gpu(recipe, megatron_runtime):
    from megatron.core.fp8_utils import get_fp8_context

    config = tiny()
    language = language_transformer_config(config, bf16=True, params_dtype=torch.bfloat16,
                                           **fp8_transformer_overrides(recipe))
    model = InternVLModel(config, language, attention_backend="te").cuda()
    rng = np.random.default_rng(0)
    batch = pack([sub_sample(config, rng, [30, ("image", 1, 0.25), 20]) for _ in range(2)], pad_multiple=32)
    batch = batch.to("cuda")
    with get_fp8_context(language):
        per_token = model(**model_inputs(batch))
    numerator, denominator = weighted_loss(per_token, batch.loss_weights)
    (numerator / denominator).backward()
    assert torch.isfinite(numerator)

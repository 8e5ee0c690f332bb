"""The tables: complete, reversible, and with the tensor-parallel split Megatron uses for each tensor."""

from __future__ import annotations

import pytest
import torch

from megatron_v2pe.checkpoint.model_only import build_model
from megatron_v2pe.convert import LAYOUTS
from megatron_v2pe.convert.checkpoint import table, weights
from megatron_v2pe.convert.mapping import SeparateQKV, StackedQKV, TPSplit
from megatron_v2pe.model.presets import internvl2_2b, tiny
from tests.convert.tiny_models import FAMILIES, family_config

pytestmark = pytest.mark.usefixtures("megatron_runtime")

CONFIG = tiny()


@pytest.fixture(scope="module", params=("internlm2", *FAMILIES, "internlm2-6b", "qwen2-6b"))
def family(request):
    """(architecture, its Megatron weights) for InternLM2 and each tiny family of ``tiny_models``, on
    InternViT-300M and (``-6b``) on the InternViT-6B-style tower."""
    family, _, tower = request.param.partition("-")
    config = family_config(family, tower or "300m")
    return config, weights(build_model(config, torch.float32, "reference"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_weight_has_exactly_one_rule(layout, family):
    config, megatron_weights = family
    entries = table(LAYOUTS[layout], config)
    names = [e.megatron for e in entries]
    hf_names = [n for e in entries for n in e.hf]
    assert sorted(names) == sorted(megatron_weights)
    assert len(set(hf_names)) == len(hf_names)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_split_rules_are_megatrons_partition_dims(layout, family):
    config, megatron_weights = family
    for e in table(LAYOUTS[layout], config):
        param = megatron_weights[e.megatron]
        megatron_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        rule_dim = 0 if e.split is TPSplit.GATED_COLUMN else e.split.value
        assert rule_dim == megatron_dim, e.megatron


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_transforms_round_trip_exactly(layout, family):
    config, megatron_weights = family
    for e in table(LAYOUTS[layout], config):
        tensor = torch.randn(megatron_weights[e.megatron].shape)
        assert torch.equal(e.transform.to_megatron(e.transform.to_hf(tensor)), tensor), e.megatron


def test_separate_qkv_puts_each_query_group_together():
    """Per group: its heads/groups query heads, then its k, then its v (a direct formula)."""
    heads, groups, d = 4, 2, 3
    q = torch.arange(heads * d).float()
    k = 100 + torch.arange(groups * d).float()
    v = 200 + torch.arange(groups * d).float()
    fused = SeparateQKV(heads, groups, d).to_megatron([q, k, v])
    expected = torch.cat(
        [
            torch.cat([q[g * 2 * d : (g + 1) * 2 * d], k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]])
            for g in range(groups)
        ]
    )
    assert torch.equal(fused, expected)


def test_stacked_qkv_regroups_per_head():
    heads, d = 3, 2
    qkv = torch.arange(3 * heads * d).float()  # [q(all heads) | k | v]
    fused = StackedQKV(heads, d).to_megatron([qkv])
    expected = torch.cat([qkv[part * heads * d + h * d :][:d] for h in range(heads) for part in range(3)])
    assert torch.equal(fused, expected)


def test_gated_split_keeps_gate_and_up_rows_of_each_rank():
    gate, up = torch.arange(8.0), 100 + torch.arange(8.0)
    shards = [TPSplit.GATED_COLUMN.shard(torch.cat([gate, up]), rank, 2) for rank in range(2)]
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))


def test_internvl2_2b_table_covers_its_48_layers():
    entries = table(LAYOUTS["internvl2"], internvl2_2b())
    assert {e.layer for e in entries if e.megatron.startswith("language_model.decoder.layers.")} == set(
        range(24)
    )
    assert "language_model.model.layers.23.attention.wqkv.weight" in {n for e in entries for n in e.hf}

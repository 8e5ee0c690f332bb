"""InternViT on Megatron-Core: shapes, float64 parity (tower + projector), bidirectional attention,
gradients, drop path, layer scale, TE parity (GPU) and InternViT-300M's parameter count."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_v2pe.model.presets import (
    VLMConfig,
    internvl2_2b,
    language_transformer_config,
    tiny,
    vision_transformer_config,
)
from megatron_v2pe.model.projector import VisionProjector
from megatron_v2pe.model.vision import InternViTModel, vision_layer_spec
from megatron_v2pe.optional_deps import is_available
from tests.model.reference_vit import reference_image_embeddings

pytestmark = pytest.mark.usefixtures("megatron_runtime")

TINY = tiny()  # 56-px tiles of 4x4 patches of 14 px, hidden 64, 2 layers -> 4 tokens per tile


def _config(**vision_changes) -> VLMConfig:
    return dataclasses.replace(TINY, vision=dataclasses.replace(TINY.vision, **vision_changes))


def _tower(config: VLMConfig = TINY, backend: str = "reference", seed: int = 0) -> InternViTModel:
    torch.manual_seed(seed)
    return InternViTModel(config.vision, vision_transformer_config(config), vision_layer_spec(backend))


def _projector(config: VLMConfig = TINY, seed: int = 1) -> VisionProjector:
    torch.manual_seed(seed)
    return VisionProjector(config, language_transformer_config(config))


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights away from Megatron's init (zero biases, layer scale 0.1), so every term shows in parity."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.dim() > 1:
            param.copy_(noise / param[0].numel() ** 0.5)
        elif name.endswith(("ls1", "ls2")) or ("norm" in name and name.endswith("weight")):
            param.copy_(1.0 + 0.3 * noise)
        else:
            param.copy_(0.3 * noise)


def _pixels(tiles: int, seed: int = 2) -> torch.Tensor:
    size = TINY.vision.image_size
    return torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_output_shapes_and_no_final_norm():
    tower, projector = _tower().eval(), _projector().eval()
    with torch.no_grad():
        features = tower(_pixels(3))
        tokens = projector(features)
    assert features.shape == (3, TINY.vision.num_patches, TINY.vision.hidden_size)
    assert tokens.shape == (3 * TINY.tokens_per_tile, TINY.language.hidden_size)
    assert tower.decoder.final_layernorm is None


def _check_against_reference(config: VLMConfig, layers_run: int, tiles: int) -> InternViTModel:
    """Tower + projector against the float64 reference running ``layers_run`` ViT layers by hand."""
    tower, projector = _tower(config).eval(), _projector(config).eval()
    _randomize(tower, 3)
    _randomize(projector, 4)
    pixels = _pixels(tiles)
    with torch.no_grad():
        got = projector(tower(pixels))
    vit = config.vision
    expected = reference_image_embeddings(
        tower.state_dict(), projector.state_dict(), pixels, num_layers=layers_run,
        num_heads=vit.num_attention_heads, patch_size=vit.patch_size, shuffle=config.shuffle_factor,
    )
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)
    return tower


def test_tower_and_projector_match_float64_reference():
    _check_against_reference(TINY, TINY.vision.num_layers, tiles=3)


@pytest.mark.parametrize(("select_layer", "layers_run"), [(-1, 3), (-2, 2), (1, 1)])
def test_select_layer_feeds_that_layers_output_to_the_projector(select_layer, layers_run):
    """InternVL's hidden_states[select_layer] (0: embeddings, -1: last layer) against the ViT run by hand
    in float64 for exactly that many layers; the layers after it never learn."""
    tower = _check_against_reference(_config(num_layers=3, select_layer=select_layer), layers_run, tiles=2)
    trainable = [all(p.requires_grad for p in layer.parameters()) for layer in tower.decoder.layers]
    assert trainable == [i < layers_run for i in range(3)]


@pytest.mark.parametrize("select_layer", [0, -4, 4])
def test_select_layer_outside_the_tower_is_refused(select_layer):
    with pytest.raises(ValueError, match=f"select_layer {select_layer} does not pick"):
        _config(num_layers=3, select_layer=select_layer)


def test_reference_spec_attention_is_unmasked():
    spec = vision_layer_spec("reference")
    assert spec.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.no_mask
    for layer in _tower().decoder.layers:
        assert layer.self_attention.core_attention.attn_mask_type == AttnMaskType.no_mask


def test_attention_is_bidirectional_and_tiles_are_independent():
    tower = _tower().eval()
    _randomize(tower, 5)
    pixels = _pixels(2)
    patch = TINY.vision.patch_size
    last_patch_changed = pixels.clone()
    last_patch_changed[0, :, -patch:, -patch:] += 1.0
    other_tile_changed = pixels.clone()
    other_tile_changed[1] += 1.0
    with torch.no_grad():
        base, last, other = (tower(x) for x in (pixels, last_patch_changed, other_tile_changed))
    assert (last[0, 0] - base[0, 0]).abs().max() > 1e-3  # the first patch sees the last one
    torch.testing.assert_close(last[1], base[1], atol=0, rtol=0)
    torch.testing.assert_close(other[0], base[0], atol=0, rtol=0)
    assert (other[1] - base[1]).abs().max() > 1e-3


def test_every_parameter_gets_a_gradient():
    tower, projector = _tower(), _projector()
    out = projector(tower(_pixels(2)))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(6))).sum().backward()
    for module in (tower, projector):
        for name, param in module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_drop_path_rate_grows_linearly_with_depth():
    tower = _tower(_config(num_layers=3, drop_path_rate=0.3))
    assert [layer.drop_path_rate for layer in tower.decoder.layers] == pytest.approx([0.0, 0.15, 0.3])


def test_drop_path_is_identity_in_eval_and_at_rate_zero():
    dropping, plain = _tower(_config(drop_path_rate=0.5)), _tower()
    plain.load_state_dict(dropping.state_dict())
    pixels = _pixels(4)
    with torch.no_grad():
        expected = plain.eval()(pixels)
        torch.testing.assert_close(dropping.eval()(pixels), expected, atol=0, rtol=0)
        torch.testing.assert_close(plain.train()(pixels), expected, atol=0, rtol=0)


def test_drop_path_drops_whole_tiles_and_scales_the_kept_ones():
    layer = _tower(_config(drop_path_rate=0.5)).decoder.layers[-1]
    hidden, tiles = TINY.vision.hidden_size, 32
    gen = torch.Generator().manual_seed(7)
    out, bias, residual = (torch.randn(*shape, generator=gen) for shape in
                           ((5, tiles, hidden), (hidden,), (5, tiles, hidden)))
    with torch.no_grad():
        layer.ls1.normal_(generator=gen)
        branch = layer.ls1 * (out + bias)
        torch.manual_seed(8)
        trained = layer.self_attn_bda(True, True)((out, bias), residual, 0.0)
        evaluated = layer.self_attn_bda(False, True)((out, bias), residual, 0.0)
    torch.testing.assert_close(evaluated, residual + branch)
    kept = [torch.allclose(trained[:, t], residual[:, t] + branch[:, t] / 0.5) for t in range(tiles)]
    dropped = [torch.equal(trained[:, t], residual[:, t]) for t in range(tiles)]
    assert all(k != d for k, d in zip(kept, dropped))  # every tile: whole branch kept or dropped
    assert 0 < sum(dropped) < tiles


def test_drop_path_is_reproducible_with_the_seed():
    tower = _tower(_config(drop_path_rate=0.5)).train()
    pixels = _pixels(8)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return tower(pixels)

    torch.testing.assert_close(run(11), run(11), atol=0, rtol=0)
    assert not torch.equal(run(11), run(12))


def test_layer_scale_multiplies_the_branches():
    """With ls1 = ls2 = 0 every layer is the identity: the features are the patch embeddings."""
    tower = _tower().eval()
    _randomize(tower, 9)
    with torch.no_grad():
        for layer in tower.decoder.layers:
            layer.ls1.zero_()
            layer.ls2.zero_()
        pixels = _pixels(2)
        expected = tower.embeddings(pixels)[1:].transpose(0, 1)
        torch.testing.assert_close(tower(pixels), expected, atol=0, rtol=0)


def test_te_backend_without_transformer_engine_says_what_is_missing():
    if is_available("transformer_engine"):
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ImportError, match="transformer-engine"):
        vision_layer_spec("te")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not is_available("transformer_engine"),
                    reason="needs a CUDA GPU with Transformer Engine")
def test_te_spec_matches_reference_spec_on_gpu():
    te_spec = vision_layer_spec("te")
    assert te_spec.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.no_mask
    reference, te_tower = _tower().cuda().eval(), _tower(backend="te").cuda().eval()
    _randomize(reference, 10)
    # The reference spec's norms are modules of their own; TE fuses them into the next linear.
    renames = vision_layer_spec("reference").submodules.sharded_state_dict_keys_map
    state = {}
    for key, value in reference.state_dict().items():
        for local, fused in renames.items():
            key = key.replace(local, fused)
        state[key] = value
    missing, unexpected = te_tower.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")]
    pixels = _pixels(3).cuda()
    with torch.no_grad():
        torch.testing.assert_close(te_tower(pixels), reference(pixels), atol=1e-4, rtol=1e-4)


def _internvit_300m_parameter_count() -> int:
    """From InternViT-300M-448px's Hugging Face parameter shapes (hidden 1024, MLP 4096, 24 layers)."""
    hidden, mlp, layers, patch, positions = 1024, 4096, 24, 14, 1 + (448 // 14) ** 2
    embeddings = (hidden * 3 * patch * patch + hidden  # patch_embedding (Conv2d, with bias)
                  + hidden                              # class_embedding
                  + positions * hidden)                 # position_embedding
    layer = (2 * 2 * hidden                             # norm1, norm2: weight + bias
             + 3 * hidden * hidden + 3 * hidden         # attn.qkv
             + hidden * hidden + hidden                 # attn.proj
             + 2 * hidden                               # ls1, ls2
             + mlp * hidden + mlp                       # mlp.fc1
             + hidden * mlp + hidden)                   # mlp.fc2
    return embeddings + layers * layer


def test_internvl2_2b_parameter_counts_on_the_meta_device():
    config = internvl2_2b()
    with torch.device("meta"):
        tower = InternViTModel(config.vision, vision_transformer_config(config, use_cpu_initialization=True),
                               vision_layer_spec("reference"))
        projector = VisionProjector(config, language_transformer_config(config, use_cpu_initialization=True))
    assert all(p.is_meta for p in [*tower.parameters(), *projector.parameters()])
    assert sum(p.numel() for p in tower.parameters()) == _internvit_300m_parameter_count()
    # LN(4096), Linear(4096, 2048), Linear(2048, 2048)
    mlp1 = 2 * 4096 + (4096 * 2048 + 2048) + (2048 * 2048 + 2048)
    assert sum(p.numel() for p in projector.parameters()) == mlp1

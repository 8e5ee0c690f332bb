"""Generation on a CUDA GPU: the tokens and logits of the CPU run, and the KV cache still equal to
recomputation there (fp32, TF32 off, so the tolerances are those of the CPU tests)."""

from __future__ import annotations

import pytest
import torch

from megatron_v2pe.eval.generation import generate
from megatron_v2pe.model.presets import language_transformer_config
from megatron_v2pe.model.vlm import InternVLModel
from tests.eval.test_generation import CONFIG, STEPS, _prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("megatron_runtime"),
]


@pytest.fixture(scope="module")
def cpu_model() -> InternVLModel:
    torch.manual_seed(0)  # built on the GPU where one is present (Megatron's layers), so moved
    model = InternVLModel(CONFIG, language_transformer_config(CONFIG), attention_backend="reference")
    return model.cpu().eval()


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _on_gpu(cpu_model: InternVLModel, backend: str) -> InternVLModel:
    model = InternVLModel(CONFIG, language_transformer_config(CONFIG), attention_backend=backend)
    model.load_state_dict(cpu_model.state_dict())
    return model.cuda().eval()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("policy", ["fixed:0.25", "none"])
def test_gpu_generation_equals_cpu_generation(cpu_model, backend, policy):
    prompts = _prompts()
    on_cpu = generate(cpu_model, prompts, STEPS, delta_policy=policy, keep_logits=True)
    on_gpu = generate(_on_gpu(cpu_model, backend), prompts, STEPS, delta_policy=policy, keep_logits=True)
    assert on_gpu.tokens == on_cpu.tokens
    torch.testing.assert_close(on_gpu.step_logits.cpu(), on_cpu.step_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("policy", ["fixed:0.25", "none"])
def test_kv_cache_equals_recomputation_on_gpu(cpu_model, policy):
    model, prompts = _on_gpu(cpu_model, "reference"), _prompts()
    cached = generate(model, prompts, STEPS, delta_policy=policy, keep_logits=True)
    recomputed = generate(model, prompts, STEPS, delta_policy=policy, use_cache=False, keep_logits=True)
    assert cached.tokens == recomputed.tokens
    torch.testing.assert_close(cached.step_logits, recomputed.step_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix, causal_new", [(0, True), (300, False), (300, True)])
def test_flash_partials_equal_the_reference_in_bf16(prefix, causal_new):
    """The torch backend's flash partials (GQA folded into the query length; square causal new keys)
    against the reference partial of the same bf16 values in fp32."""
    from megatron_v2pe.parallel.cache_attention import reference_partial
    from megatron_v2pe.parallel.torch_attention import cache_partial

    torch.manual_seed(0)
    n, keys = 37, prefix + (37 if causal_new else 0)
    q = torch.randn(n, 16, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, keys, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = cache_partial(q, k, v, prefix, causal_new, 128**-0.5)
    want, want_lse = reference_partial(q.float(), k.float(), v.float(), prefix, causal_new, 128**-0.5)
    torch.testing.assert_close(lse, want_lse, atol=2e-2, rtol=0)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=0)


@pytest.mark.parametrize("chunk", [3, 7])
def test_chunked_prefill_with_the_torch_backend_in_bf16(cpu_model, chunk):
    """bf16 on the GPU (flash partials): chunked prefill then decoding against one forward, to bf16
    rounding."""
    model = _on_gpu(cpu_model, "torch").to(torch.bfloat16)
    prompts = _prompts()
    whole = generate(model, prompts, STEPS, delta_policy="fixed:0.25", prefill_chunk=10**6, keep_logits=True)
    chunked = generate(
        model, prompts, STEPS, delta_policy="fixed:0.25", prefill_chunk=chunk, keep_logits=True
    )
    torch.testing.assert_close(
        chunked.step_logits[0].float(), whole.step_logits[0].float(), atol=5e-2, rtol=0
    )


def test_decoding_replays_a_cuda_graph_equal_to_eager_steps(cpu_model):
    """The decode step is captured (no fallback warning) and its replays give the eager steps' logits."""
    import warnings

    from megatron_v2pe.eval.decode_step import DecodeStep
    from megatron_v2pe.eval.generation import pack_prompts, prompt_positions, resolve_delta_policy
    from megatron_v2pe.eval.kv_cache import kv_cache
    from megatron_v2pe.eval.prefill import prefill

    model, prompts = _on_gpu(cpu_model, "torch"), _prompts()
    positions, _ = prompt_positions(model, prompts, resolve_delta_policy(model, "fixed:0.25"), 6)
    packed = pack_prompts(prompts, positions)
    runs = []
    for use_graph in (True, False):
        with torch.no_grad(), kv_cache(model, len(prompts), max(packed.lengths) + 6) as cache:
            logits = prefill(model, cache, packed, 4, packed.ends)
            step = DecodeStep(model, cache, use_graph=use_graph)
            steps = []
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                for k in range(5):
                    where = torch.tensor([p[-1] + 1 + k for p in positions], dtype=torch.float64)
                    logits = step(logits.argmax(dim=-1), where)
                    steps.append(logits.clone())
            assert (step.graph is not None) == use_graph
            runs.append(torch.stack(steps))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=0)

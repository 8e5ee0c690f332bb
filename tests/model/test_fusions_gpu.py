"""The chunked loss and the compiled RMSNorm on the GPU in bf16, at the InternVL2-2B vocabulary: the same
values as the plain path (bf16 tolerances: loss 1e-3 relative, gradients 2e-2 in relative L2 norm) and,
for the loss, the memory the arithmetic promises."""

from __future__ import annotations

import pytest
import torch

from megatron_v2pe.model.chunked_loss import chunked_cross_entropy
from megatron_v2pe.model.norms import CompiledRMSNorm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("megatron_runtime")]
TOKENS, HIDDEN, VOCAB, CHUNK = 8192, 2048, 92553, 1024


def _relative(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _loss_grads_peak(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    loss = fn(hidden, weight, labels)
    loss.sum().backward()
    torch.cuda.synchronize()
    return loss.detach(), hidden.grad, weight.grad, torch.cuda.max_memory_allocated() - start


def test_chunked_loss_equals_megatron_in_bf16_with_a_fraction_of_the_memory():
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    generator = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, device="cuda", generator=generator).bfloat16().requires_grad_(True)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=generator) / HIDDEN**0.5).bfloat16()
    weight.requires_grad_(True)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=generator)

    def unfused(h, w, y):
        return vocab_parallel_cross_entropy((h @ w.t())[:, None].float(), y[:, None])[:, 0]

    expected = _loss_grads_peak(unfused, hidden, weight, labels)
    got = _loss_grads_peak(lambda h, w, y: chunked_cross_entropy(h, w, y, CHUNK), hidden, weight, labels)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-3)
    assert _relative(got[1], expected[1]) <= 2e-2 and _relative(got[2], expected[2]) <= 2e-2
    logits_bytes = TOKENS * VOCAB * 4
    assert expected[3] >= logits_bytes  # the unfused path holds at least the float32 logits
    # a chunk's bf16 and float32 logits; the weight gradient: float32 sum, one chunk's bf16 term, bf16 result
    chunk_and_weight_grad = CHUNK * VOCAB * (2 + 4) + VOCAB * HIDDEN * (4 + 2 + 2)
    assert got[3] <= 1.5 * chunk_and_weight_grad, (got[3], chunk_and_weight_grad)


def test_compiled_rms_norm_equals_torch_in_bf16():
    torch.manual_seed(0)
    plain = torch.nn.RMSNorm(HIDDEN, eps=1e-5, device="cuda", dtype=torch.bfloat16)
    compiled = CompiledRMSNorm(HIDDEN, eps=1e-5, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        compiled.weight.copy_(plain.weight)
    x = torch.randn(TOKENS, 1, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn_like(x)
    outputs = []
    for norm in (plain, compiled):
        x.grad = None
        y = norm(x)
        y.backward(upstream)
        outputs.append((y.detach(), x.grad, norm.weight.grad))
    (y0, gx0, gw0), (y1, gx1, gw1) = outputs
    torch.testing.assert_close(y1, y0, atol=2e-2, rtol=2e-2)
    assert _relative(gx1, gx0) <= 2e-2 and _relative(gw1, gw0) <= 2e-2

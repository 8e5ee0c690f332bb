"""One decoding step of every sequence of a cached batch, fed from fixed input buffers.

The step reads its tokens and positions from buffers written in place, and the KV cache its lengths
(``KVCache.decode_lengths``), so every tensor of the forward keeps its address and shape from step to
step. On a GPU the step is then captured once as a CUDA graph and replayed: decoding a few tokens per
step is otherwise bound by the CPU time of launching every layer's kernels. The first replays are
checked against the eager step; a capture that fails or disagrees falls back to eager steps, with a
warning. Decoded tokens are text (the chooser never picks `<IMG_CONTEXT>`), so the step embeds them
directly, without merging image features.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from megatron_v2pe.eval.kv_cache import KVCache
from megatron_v2pe.eval.prefill import packed_params

CHECKED_REPLAYS = 2
"""Graph replays compared with the eager step before the graph is trusted."""


class DecodeStep:
    """``step(tokens [B], positions [B] float64, on the host)`` -> logits [B, vocab] of the next tokens."""

    def __init__(self, model, cache: KVCache, use_graph: bool):
        self.model, self.cache = model, cache
        device = next(model.parameters()).device
        size = cache.held.shape[1]
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.float64, device=device)
        self.params = packed_params([1] * size, device)
        self.use_graph = use_graph and device.type == "cuda" and cache.group is None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Tensor | None = None
        self.checks_left = CHECKED_REPLAYS

    def forward(self) -> Tensor:
        """The language model on the buffers (through the cache's attention)."""
        language_model = self.model.language_model
        embedded = language_model.embedding(input_ids=self.tokens[None], position_ids=None)
        return language_model(
            None, positions=self.positions[None], decoder_input=embedded, packed_seq_params=self.params
        )[0]

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        with self.cache.extend([1] * self.tokens.numel(), positions.numpy()):
            self.tokens.copy_(tokens)
            self.positions.copy_(positions)
            if not self.use_graph:
                return self.forward()
            if self.graph is None:
                self.graph = self._capture()
                return self.forward()
            self.graph.replay()
            if self.checks_left:
                self._check(self.forward())  # rewrites the same cache slots with the same values
            return self.output.clone()

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """The step as a CUDA graph (warmed up on a side stream, as capture requires), or None."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.output = self.forward()
            return graph
        except RuntimeError as err:
            self._give_up(f"capture failed ({err})")
            return None

    def _check(self, eager: Tensor) -> None:
        self.checks_left -= 1
        difference = float((self.output.float() - eager.float()).abs().max())
        if difference > 1e-3 * max(1.0, float(eager.float().abs().max())):
            self._give_up(f"a replay differs from the eager step by {difference:.3g}")

    def _give_up(self, why: str) -> None:
        warnings.warn(f"decoding without a CUDA graph: {why}", RuntimeWarning, stacklevel=3)
        self.use_graph, self.graph = False, None

"""One decode step captured in a CUDA graph and replayed with new inputs.

A decode step of a ~1B model at batch 64 is a few hundred small kernels; launched one by one from
Python they cost several times the step's HBM-bound time (the weights' bytes over the bandwidth).
A CUDA graph launches them all at once. It needs every shape fixed and every input at a fixed
address: `DecodeEngine.forward_static` is that step (positions as a device tensor, attention over
the whole static cache under a mask), and this wrapper owns the input buffers. The graph reads the
parameters and KV caches where they are, so an in-place optimizer step is seen by the next
rollout; a new generation batch (new caches) captures a new graph.
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    """fn(tokens, pos) -> logits, captured once, then `step(tokens, pos)` replays it.

    The returned logits tensor is the graph's own output buffer: the next call overwrites it.
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                 pos: torch.Tensor, warmup: int = 2):
        if not tokens.is_cuda:
            raise ValueError("CUDA graphs need the model on a CUDA device "
                             "(RolloutConfig.decode_steps='static' or 'dynamic' on CPU)")
        self.tokens, self.pos = tokens.clone(), pos.clone()
        # Warm-up on a side stream (lazy kernel and workspace setup must not be captured). The
        # step writes each row's key and value at its position: repeating it with the same inputs
        # writes the same values, so the warm-up runs and the capture leave the caches as one step does.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(self.tokens, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.tokens, self.pos)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.out

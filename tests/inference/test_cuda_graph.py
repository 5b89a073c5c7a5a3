"""`inference/cuda_graph.GraphedStep`: capture once, replay with new inputs, no stale weights.

The capture needs CUDA: on CPU-only machines (CI) only the refusal runs; the end-to-end GPU check
of a graphed decode step is `benchmarks/gpu/suite.py` (its tokens must equal the eager static step's).
"""

import pytest
import torch

from megatron_xomni.inference.cuda_graph import GraphedStep


def test_refuses_cpu_tensors_with_the_fix():
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        GraphedStep(lambda t, p: t, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replay_equals_eager_and_reads_weights_in_place():
    g = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randn(50, 16, device="cuda", generator=g)
    w = torch.randn(16, 7, device="cuda", generator=g)

    def fn(tokens, pos):  # an embedding, a product, a position-dependent term: shapes fixed
        return table[tokens.view(-1)] @ w + pos.view(-1, 1).float()

    tokens = torch.tensor([[3], [9], [41]], device="cuda")
    pos = torch.tensor([5, 6, 7], device="cuda")
    step = GraphedStep(fn, tokens, pos)
    for t in range(3):
        new_tokens, new_pos = (tokens * (t + 2)) % 50, pos + t
        torch.testing.assert_close(step(new_tokens, new_pos).clone(), fn(new_tokens, new_pos), rtol=0, atol=0)
    w.mul_(-0.5)  # an optimizer step in place: the graph reads the same storage
    torch.testing.assert_close(step(tokens, pos).clone(), fn(tokens, pos), rtol=0, atol=0)

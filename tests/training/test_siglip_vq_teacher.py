"""The SigLIP-VQ trainer's frozen LLM from a Megatron checkpoint goes through load_xomni: the weights are
the checkpoint's tensors (read here straight from the dist-ckpt into a freshly built model), from the
checkpoint root and from one of its iteration folders alike."""
from __future__ import annotations

import pytest

from tests.inference.fixtures import bundle  # noqa: F401  (session fixture: a tiny saved model)
from tests.multirank import run_ranks

pytestmark = pytest.mark.timeout(240)


def _rank(rank, world, root):
    import torch

    from megatron_xomni.checkpointing import load_checkpoint, resolve_checkpoint
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.siglip_vq import build_llm
    from megatron_xomni.training.siglip_vq_config import TeacherSection

    pg = initialize_parallel(ParallelConfig(), seed=0)
    from_root = build_llm(TeacherSection(checkpoint=str(root)), 3, pg)
    folder = resolve_checkpoint(root)
    from_folder = build_llm(TeacherSection(checkpoint=str(folder)), 4, pg)
    (ref,) = build_model_chunks(model_preset("tiny"), ParallelConfig(), pg)  # random init, then the tensors
    ref.load_state_dict(load_checkpoint(folder, {"model": ref.sharded_state_dict()}, partial=True)["model"],
                        strict=False)
    random, = build_model_chunks(model_preset("tiny"), ParallelConfig(), pg)
    tensors = lambda m: {k: v for k, v in m.state_dict().items() if torch.is_tensor(v)}  # noqa: E731
    want = tensors(ref)
    return {
        "root": all(torch.equal(v, want[k]) for k, v in tensors(from_root).items()),
        "folder": all(torch.equal(v, want[k]) for k, v in tensors(from_folder).items()),
        "differs_from_init": any(not torch.equal(v, want[k]) for k, v in tensors(random).items()),
        "count": len(want),
    }


def test_teacher_weights_are_the_checkpoints(bundle):
    out, = run_ranks(_rank, 1, bundle / "model")
    assert out["count"] > 10 and out["differs_from_init"]
    assert out["root"] and out["folder"]

"""Reading a checkpoint's tensors back as plain global tensors (for bit-exact comparisons)."""

from __future__ import annotations

from pathlib import Path

from tests.multirank import run_ranks


def _plain(rank, world, path):
    from megatron.core import dist_checkpointing

    from megatron_xomni import safe_loading
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig())
    safe_loading.install()
    return dist_checkpointing.load_plain_tensors(path)


def plain_state(folder: Path) -> dict:
    """Every entry of a checkpoint folder (model and optimizer), flattened to dotted keys: a megatron-core
    dist-ckpt, or a torch DCP payload in <folder>/dcp (converted offline, no process group)."""
    if (folder / "dcp").is_dir():
        import torch
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(folder / "dcp", folder.parent / f"{folder.name}.pt")
        return flatten(torch.load(folder.parent / f"{folder.name}.pt", weights_only=True))
    (state,) = run_ranks(_plain, 1, str(folder))
    return flatten(state)


def flatten(state) -> dict:
    flat = {}

    def walk(prefix, node):
        if isinstance(node, (dict, list, tuple)):
            for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", state)
    return flat


def assert_same_state(a: dict, b: dict) -> None:
    import torch

    assert sorted(a) == sorted(b)
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key

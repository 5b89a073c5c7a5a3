"""SIGTERM and SIGUSR1 without SLURM: the AR, GRPO and decoder trainers save a checkpoint at the
signalled step and exit with code 3 (the requeue code), also when a second signal arrives while
that checkpoint is being written. (SigLIP-VQ: tests/training/test_siglip_vq.py; the SLURM path:
tests/slurm/test_slurm_local.py.) The signal is sent from the trainers' own fault points, at a
named step, never on a timer."""

from __future__ import annotations

import os
import signal

import pytest

from megatron_xomni.checkpointing import latest_iteration
from megatron_xomni.recipes import load_recipe
from tests.multirank import run_ranks
from tests.training.test_recipe_matrix import _shrunk, world  # noqa: F401  (the matrix's fixtures)


def _signalled(rank, world_size, cfg, sig, at):
    """Run the stage; rank 0 gets `sig` after step `at`, and again while that step's checkpoint is written."""
    from megatron_xomni.train import run_config
    from megatron_xomni.training import faults

    real = faults.fire

    def fire(point, step, spec):
        if rank == 0 and step == at and point in ("after_step", "in_save"):
            os.kill(os.getpid(), sig)
        real(point, step, spec)

    faults.fire = fire
    try:
        return run_config(cfg)
    finally:
        faults.fire = real


@pytest.mark.slow
@pytest.mark.parametrize("name, sig", [("tiny_pt", signal.SIGUSR1), ("tiny_grpo", signal.SIGTERM),
                                       ("tiny_decoder", signal.SIGUSR1)])
def test_a_signal_saves_that_step_and_exits_3(world, tmp_path, name, sig):  # noqa: F811
    cfg, nproc = _shrunk(name, world, tmp_path / "run", [])
    cfg.save_interval = 100  # the only checkpoint before the end is the signalled one
    codes = run_ranks(_signalled, nproc, cfg, sig, 3, timeout=400)
    assert codes == [3] * nproc
    assert latest_iteration(tmp_path / "run") == 3
    assert sorted(p.name for p in (tmp_path / "run").glob("iter_*")) == ["iter_0000003"]
    again, _ = _shrunk(name, world, tmp_path / "run", [])  # the requeued job continues to the end
    assert run_ranks(_signalled, nproc, again, sig, -1, timeout=400) == [0] * nproc
    assert latest_iteration(tmp_path / "run") == again.steps
    assert load_recipe(name).RUNNER  # a registry recipe of a stage with a runner

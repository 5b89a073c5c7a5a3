"""`xomni scaling launch --slurm`: a sweep as ONE job array through submit.py's template and checks.

a. (no cluster) --dry-run renders `#SBATCH --array=<pending indices>`, per-element logs and the
   element command reading the frozen sweep copy; a world size other than the sweep's is refused
   in one line before sbatch; nothing is written.
b. (local SLURM cluster, tools/slurm_local.sh start) a 2-element array completes: both runs reach
   their final checkpoint, each element logs its own file and attempt, and a re-launch submits nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from megatron_xomni.checkpointing import latest_iteration
from megatron_xomni.data.synthetic_tokens import write_synthetic_tokens
from megatron_xomni.scaling.plan import PlanRequest, plan, write_sweep
from tests.scaling.test_sweep import cli
from tests.slurm.test_slurm_local import FINAL_STATES, _cluster_problem

_PROBLEM = _cluster_problem()


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A planned micro sweep cut to two runs (the file format allows any list of runs)."""
    root = tmp_path_factory.mktemp("scaling_array")
    write_synthetic_tokens(root / "syn", 300, 512, 256, seed=0)
    sweep = plan(PlanRequest(recipe="tiny_pt", out=str(root / "sw"), depths=[1, 2, 3], budgets=[2.5e9, 5e9],
                             overrides=[f'data.blend=["{root}/syn"]', f"data.cache_dir={root}/cache"],
                             family=["aspect_ratio=32", "head_dim=16"], evals=2, eval_iters=1))
    sweep["runs"] = [dict(r, index=i) for i, r in enumerate(sweep["runs"][:2])]
    write_sweep(sweep, root / "sw" / "sweep.json")
    return root / "sw"


RESOURCES = ("--nodes", "1", "--ranks-per-node", "1", "--cpus-per-task", "1", "--time", "00:10:00")


def test_dry_run_renders_one_array(sweep_dir):
    rc, out, err = cli("launch", str(sweep_dir), "--slurm", *RESOURCES, "--max-parallel", "2", "--dry-run")
    assert rc == 0, err
    script = out.split("\n# would run:")[0]
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --job-name=sw" in script
    assert "/slurm/logs/%x-%A_%a.out" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True, timeout=30).returncode == 0
    m = re.search(r"-m megatron_xomni\.scaling\.element (\S+)", script)
    assert m and re.fullmatch(rf"{re.escape(str(sweep_dir))}/slurm/sweep-[0-9a-f]{{12}}\.json", m.group(1)), script
    assert "tiny_pt" not in script.split("srun ", 1)[1]  # no run's values in the script: the element reads them
    assert not (sweep_dir / "slurm").exists(), "--dry-run must not write anything"

    # the sweep was validated for one rank per run: two ranks per element are refused before sbatch
    rc, out, err = cli("launch", str(sweep_dir), "--slurm", "--nodes", "1", "--ranks-per-node", "2", "--dry-run")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "planned and validated for world size 1, not 2" in err
    rc, _, err = cli("launch", str(sweep_dir), "--slurm", "--dry-run")
    assert rc == 2 and "--slurm needs --nodes" in err


def test_only_unfinished_runs_become_elements(sweep_dir, tmp_path):
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    for r in sweep["runs"]:
        r["save_dir"] = str(tmp_path / "runs" / r["name"])
    sweep["runs"] += [dict(sweep["runs"][1], index=i, name=f"copy{i}", save_dir=str(tmp_path / "runs" / f"copy{i}"))
                      for i in range(2, 6)]
    write_sweep(sweep, tmp_path / "sweep.json")
    for i in (1, 4):  # what the trainer's checkpoint manager writes last: the final iteration is saved
        d = Path(sweep["runs"][i]["save_dir"])
        d.mkdir(parents=True)
        (d / "latest_checkpointed_iteration.txt").write_text(str(sweep["runs"][i]["steps"]))
    rc, out, err = cli("launch", str(tmp_path), "--slurm", *RESOURCES, "--dry-run")
    assert rc == 0, err
    assert "#SBATCH --array=0,2-3,5\n" in out and "2 of 6 runs finished; would submit 4" in err


def _element_states(job_id: str) -> dict[int, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    states = {}
    for line in out.stdout.splitlines():
        f = dict(re.findall(r"(\w+)=(\S*)", line))
        if f.get("ArrayTaskId", "").isdigit():
            states[int(f["ArrayTaskId"])] = f["JobState"]
    return states


@pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")
@pytest.mark.timeout(300)
def test_two_element_array_completes_and_relaunch_submits_nothing(sweep_dir):
    rc, out, err = cli("launch", str(sweep_dir), "--slurm", *RESOURCES)
    assert rc == 0, err
    job_id = out.strip()
    assert job_id.isdigit(), out
    try:
        deadline = time.monotonic() + 240
        states = {}
        while time.monotonic() < deadline:
            states = _element_states(job_id)
            if len(states) == 2 and all(s in FINAL_STATES for s in states.values()):
                break
            time.sleep(1)
        logs = {p.name: p.read_text() for p in (sweep_dir / "slurm" / "logs").glob("*.out")}
        assert states == {0: "COMPLETED", 1: "COMPLETED"}, (states, {k: v[-2000:] for k, v in logs.items()})
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    assert sorted(logs) == [f"sw-{job_id}_0.out", f"sw-{job_id}_1.out"]
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    for i, run in enumerate(sweep["runs"]):
        log = logs[f"sw-{job_id}_{i}.out"]
        assert f"array element {i}: run {run['name']}" in log and "trainer exited with code 0" in log, log[-2000:]
        assert latest_iteration(run["save_dir"]) == run["steps"]
        attempts = [json.loads(l) for l in (Path(run["save_dir"]) / "scaling_attempts.jsonl").read_text().splitlines()]
        assert len(attempts) == 1 and attempts[0]["exit_code"] == 0 and attempts[0]["where"].startswith("slurm job ")

    rc, out, err = cli("launch", str(sweep_dir), "--slurm", *RESOURCES)
    assert rc == 0 and out == "" and "all 2 runs finished, nothing to submit" in err, (out, err)

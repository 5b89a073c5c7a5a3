"""Every value `xomni submit` writes into an sbatch script is validated or quoted: none can add a
line or a command. No cluster needed: these render with --dry-run."""

import contextlib
import io
import re
import shlex
import subprocess

import pytest

from megatron_xomni.slurm import submit


def _dry(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = submit.main(["tiny_pt", "--nodes", "1", "--ranks-per-node", "2", "--dry-run", *args])
    return rc, out.getvalue(), err.getvalue()


def _launch_argv(script: str) -> list[str]:
    """The trainer's argv as bash would pass it: the srun command (continued lines joined)."""
    body = script.replace("\\\n", " ")
    line = next(l for l in body.splitlines() if l.lstrip().startswith("srun "))
    return shlex.split(line.split("&")[0])


def test_hostile_override_values_arrive_as_single_arguments(tmp_path):
    hostile = ['name=ok', 'data.blend=["a b; touch /tmp/x", "$(touch /tmp/y)"]', "save_dir=" + str(tmp_path / "run"),
               "optim.lr=3e-3", "data.cache_dir=`id`"]
    rc, script, err = _dry(*hostile)
    assert rc == 0, err
    script = script.rsplit("# would run:", 1)[0]
    argv = _launch_argv(script)
    for value in hostile:
        assert value in argv  # one argument, byte for byte
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    # outside the quoted srun arguments, nothing user-controlled appears unquoted
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            assert not re.search(r"[\s;`$'\"]", line[len("#SBATCH "):]), line


@pytest.mark.parametrize("args, text", [
    (["data.cache_dir=/tmp/x\necho pwned"], "control character"),
    (["data.blend=[\"x\"]\necho pwned"], "control character"),
    (["--partition", "gpu;rm -rf ~"], "--partition"),
    (["--account", "a b"], "--account"),
    (["--sbatch-arg=--mem=0 --qos=high"], "--sbatch-arg"),
    (["--sbatch-arg=--comment=$(id)"], "--sbatch-arg"),
    (["--run-dir", "/tmp/a b"], "run directory"),
    (["--run-dir", "/tmp/x\n#SBATCH --uid=0"], "run directory"),
    (["--entry", "os;id"], "--entry"),
])
def test_unsafe_values_are_refused_in_one_line(args, text):
    rc, out, err = _dry(*args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], err


def test_single_process_stage_gets_one_rank(monkeypatch):
    """A stage whose config is not DISTRIBUTED runs as one process on one node."""
    from megatron_xomni.training.config import ARRunConfig

    monkeypatch.setattr(ARRunConfig, "DISTRIBUTED", False)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = submit.main(["tiny_pt", "--nodes", "1", "--ranks-per-node", "4", "--dry-run"])
    assert rc == 0, err.getvalue()
    assert "--nproc-per-node=1" in out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err := io.StringIO()):
        assert submit.main(["tiny_pt", "--nodes", "2", "--ranks-per-node", "1", "--dry-run"]) == 2
    assert "--nodes 1" in err.getvalue()


def _layout_for(cfg) -> list[str]:
    """Resources that fit a recipe's layout: 8-GPU nodes for the X-Omni ones, 2 CPU ranks for the tiny."""
    if not type(cfg).DISTRIBUTED:
        return ["--nodes", "1", "--ranks-per-node", "1"]
    p = getattr(cfg, "parallel", None)
    if p is not None and p.tensor_parallel * p.pipeline_parallel * p.context_parallel > 1:
        return ["--nodes", "4", "--gpus-per-node", "8"]
    return ["--nodes", "1", "--ranks-per-node", "2"]


def test_every_recipe_of_every_stage_renders_a_valid_script(tmp_path):
    """`xomni submit --dry-run` for each registry recipe: layout and types checked (its inputs need not
    exist), and bash accepts the script."""
    from megatron_xomni.recipes import available_recipes, load_recipe

    names = available_recipes()
    kinds = {type(load_recipe(n)).__name__ for n in names}
    assert len(kinds) >= 6, kinds  # text tokenizer, SigLIP-VQ, tokenization, AR, decoder, GRPO
    for name in names:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = submit.main([name, *_layout_for(load_recipe(name)), "--dry-run", f"save_dir={tmp_path / name}"])
        assert rc == 0, f"{name}: {err.getvalue()}"
        script = out.getvalue().rsplit("# would run:", 1)[0]
        check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert check.returncode == 0, f"{name}: {check.stderr}"
        assert f" {name} " in script.replace("\\\n", " ")

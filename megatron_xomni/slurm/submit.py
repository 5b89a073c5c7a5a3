"""`xomni submit`: submit any recipe of any stage to SLURM.

Loads the recipe with its overrides and checks its layout and types against the world size the
job will have (nodes x GPUs, or nodes x ranks on CPU) *before* anything is submitted - not its
local paths, which are checked when the job starts (so a recipe can be rendered before its inputs
exist). Renders the package's train.sbatch into the run folder (<save_dir>/slurm/<name>.sbatch)
and submits it with `sbatch --parsable`. The job id is the only thing printed on stdout. GPU jobs
are validated as running where Transformer Engine is installed (context parallelism needs it).
Stages that run as one process (corpus tokenization, the text tokenizer) get one node and one rank.
Every value written into the script is validated or shell-quoted: no value can add a line.

Examples:
  xomni submit xomni_7b_pt1 --nodes 16 --partition gpu --time 48:00:00 parallel.tensor_parallel=4
  xomni submit tiny_pt --nodes 1 --ranks-per-node 2 --dry-run      # CPU, show the script only
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "train.sbatch"
RANK_SHIM = HERE / "rank_exit.sh"
DEFAULT_GPUS_PER_NODE = 8
EXIT_USAGE = 2  # bad arguments, unknown recipe or an impossible layout: nothing was submitted


class SubmitError(Exception):
    """A problem with the request; reported as one line, exit code 2."""


@dataclass
class JobSpec:
    """Everything that goes into one rendered sbatch script."""

    recipe: str
    """Recipe name passed to the trainer (e.g. tiny_pt)."""
    overrides: list[str]
    """key=value overrides passed to the recipe, verbatim."""
    job_name: str
    """SLURM job name (%x in the log file name): the run name."""
    nodes: int
    """Number of nodes; one torchrun per node."""
    nproc_per_node: int
    """Ranks per node: GPUs per node, or CPU ranks per node when gpus_per_node == 0."""
    gpus_per_node: int
    """GPUs requested per node (0 = CPU job, no --gpus-per-node line)."""
    run_dir: Path
    """Where the rendered script, logs and requeue markers go (<save_dir>/slurm)."""
    time_limit: str = "04:00:00"
    """Wall-clock limit per attempt; the job requeues itself to continue after it."""
    signal_lead: int = 120
    """Seconds before the time limit at which SIGUSR1 asks the trainer to save and requeue."""
    partition: Optional[str] = None
    """SLURM partition (None = the cluster default)."""
    account: Optional[str] = None
    """SLURM account to charge (None = the user's default)."""
    cpus_per_task: Optional[int] = None
    """CPUs for the one task per node (None = SLURM default; whole nodes on GPU jobs)."""
    max_requeues: int = 100
    """Give up instead of requeueing once the job has been requeued this often."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra sbatch options, written as #SBATCH lines (e.g. --mem=0, --qos=high)."""
    entry_module: str = "megatron_xomni.train"
    """Python module each rank runs (python -m ...)."""
    python: str = sys.executable
    """Interpreter on the compute nodes (the submitting one: same environment)."""
    workdir: Path = field(default_factory=Path.cwd)
    """Job working directory: where `xomni submit` ran, so relative paths mean the same there."""
    nccl_debug: str = "WARN"
    """NCCL_DEBUG level for the job."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def script_path(self) -> Path:
        return self.run_dir / f"{self.job_name}.sbatch"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def shutdown_timeout(self) -> int:
        # torchrun's grace period for the ranks to save after the warning: most of the lead time,
        # leaving ~20 s for the requeue itself.
        return max(self.signal_lead - 20, 10)


def _directives(spec: JobSpec) -> str:
    lines = []
    if spec.gpus_per_node > 0:
        lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
        # Whole nodes: TP/SP traffic over NVLink must not share the node with other jobs.
        lines.append("#SBATCH --exclusive")
    if spec.cpus_per_task is not None:
        lines.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        lines.append(f"#SBATCH --account={spec.account}")
    return "\n".join(lines) if lines else "# (no GPU, CPU-count, partition or account options)"


# What may appear unquoted in the script: #SBATCH lines cannot be shell-quoted, so these values are
# checked instead (no whitespace, quotes, $, `, ;, newlines...).
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@,:=~-]+$")
_SAFE_WORD = re.compile(r"^[A-Za-z0-9_.,:+-]+$")
_SBATCH_OPT = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_./+@,:=%~-]+)?$")
_NCCL_LEVELS = ("VERSION", "WARN", "INFO", "TRACE")


def _check_values(spec: JobSpec) -> None:
    """Every value that reaches the script unquoted is of a safe form; quoted ones hold no control
    characters (a newline would end the script's comment line that echoes the command)."""
    for name, value in (("run directory", str(spec.run_dir)), ("working directory", str(spec.workdir))):
        if not _SAFE_PATH.match(value):
            raise SubmitError(f"{name} {value!r} has characters an sbatch script cannot hold "
                              "(spaces, quotes, $, ;, newlines...): use --run-dir / a working directory without them")
    for name, value in (("--partition", spec.partition), ("--account", spec.account)):
        if value is not None and not _SAFE_WORD.match(value):
            raise SubmitError(f"{name} {value!r}: use letters, digits and _.,:+- only")
    for opt in spec.sbatch_args:
        if not _SBATCH_OPT.match(opt):
            raise SubmitError(f"--sbatch-arg {opt!r}: give one sbatch option as --name or --name=value "
                              "(no spaces, quotes or newlines)")
    if spec.nccl_debug not in _NCCL_LEVELS:
        raise SubmitError(f"NCCL debug level {spec.nccl_debug!r}: use one of {', '.join(_NCCL_LEVELS)}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", spec.entry_module):
        raise SubmitError(f"--entry {spec.entry_module!r} is not a Python module name")
    for value in [spec.recipe, spec.python, *spec.overrides]:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise SubmitError(f"{value!r} holds a control character (a newline?): remove it")


def render(spec: JobSpec, template: Path = TEMPLATE) -> str:
    """The sbatch script for `spec`. Raises SubmitError if template and values do not match, or a
    value could change the script's meaning."""
    _check_values(spec)
    text = template.read_text()
    extra = "\n".join(f"#SBATCH {a}" for a in spec.sbatch_args) or "# (no extra sbatch options)"
    q = shlex.quote
    values: dict[str, Any] = {
        "job_name": spec.job_name,
        "nodes": spec.nodes,
        "nproc_per_node": spec.nproc_per_node,
        "world_size": spec.world_size,
        "resource_directives": _directives(spec),
        "time_limit": spec.time_limit,
        "log_dir": spec.log_dir,
        "signal_lead": spec.signal_lead,
        "shutdown_timeout": spec.shutdown_timeout,
        "workdir": spec.workdir,
        "extra_directives": extra,
        "python": q(spec.python),
        "run_dir": q(str(spec.run_dir)),
        "nccl_debug": q(spec.nccl_debug),
        # A step gets 1 CPU per task unless told otherwise: torchrun and all its ranks would
        # then share one core. Without an explicit count, give the task every CPU of the node.
        "srun_cpus": f"--cpus-per-task={spec.cpus_per_task}" if spec.cpus_per_task
        else '--cpus-per-task="$SLURM_CPUS_ON_NODE"',
        "rank_shim": q(str(RANK_SHIM)),
        "entry_module": q(spec.entry_module),
        "recipe": q(spec.recipe),
        "overrides": " ".join(q(o) for o in spec.overrides),
        "max_requeues": spec.max_requeues,
    }
    # Placeholders are lower_case by convention; UPPER_CASE ${...} are the script's own variables.
    tmpl = string.Template(text)
    wanted = {i for i in tmpl.get_identifiers() if i == i.lower()}
    if wanted - values.keys() or values.keys() - wanted:
        raise SubmitError(
            f"{template} and submit.py disagree: placeholders without a value "
            f"{sorted(wanted - values.keys())}, values without a placeholder "
            f"{sorted(values.keys() - wanted)}"
        )
    return tmpl.safe_substitute({k: str(v) for k, v in values.items()})


# ---- recipe --------------------------------------------------------------------------------------
def _import_loader(spec: str) -> Callable[[str, list[str]], Any]:
    module, _, func = spec.partition(":")
    if not module or not func:
        raise SubmitError(f"--recipe-loader {spec!r}: expected MODULE:FUNCTION")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise SubmitError(f"cannot load the recipe loader {spec}: {e}") from e


def load_and_validate(loader_spec: str, recipe: str, overrides: list[str], world_size: int,
                      gpu_job: bool = False):
    """The recipe's config (any stage), with its layout and types checked for `world_size` ranks.
    Local paths are not checked: the job checks them when it starts.

    The check runs here, on the submitting machine, but is about the compute nodes: a GPU job
    is validated as having Transformer Engine attention there (the `gpu` extra installs it), which
    context parallelism needs; a CPU job never has it.
    """
    # Importing megatron-core on a login node warns that Transformer Engine/Apex are missing:
    # irrelevant here (the job runs elsewhere) and it would bury the one-line error below.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    loader = _import_loader(loader_spec)
    try:
        cfg = loader(recipe, list(overrides))
    except (ValueError, KeyError, TypeError, ImportError, FileNotFoundError) as e:
        raise SubmitError(f"recipe {recipe!r} with overrides {overrides}: {_one_line(e)}") from e
    kwargs = {}
    if "have_te_attention" in inspect.signature(cfg.validate).parameters:
        kwargs["have_te_attention"] = gpu_job
    try:
        cfg.validate(world_size, **kwargs)
    except ValueError as e:  # LayoutError is a ValueError
        raise SubmitError(f"invalid layout for world size {world_size}: {_one_line(e)}") from e
    return cfg


def _distributed(loader_spec: str, recipe: str, overrides: list[str]) -> bool:
    """Whether the recipe's stage runs one process per rank (its config's DISTRIBUTED flag)."""
    try:
        cfg = _import_loader(loader_spec)(recipe, list(overrides))
    except Exception:  # reported with its one-line message by load_and_validate
        return True
    return bool(getattr(type(cfg), "DISTRIBUTED", True))


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


# ---- command line --------------------------------------------------------------------------------
_NAME_OK = re.compile(r"^[A-Za-z0-9_.+-]+$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xomni submit",
        description=__doc__.split("Examples:")[0].strip(),
        epilog="Examples:" + __doc__.split("Examples:")[1]
        + "\nExit codes: 0 submitted (or dry run), 2 bad request/layout (nothing submitted), "
        "other: sbatch failed.\nThe job requeues itself when the trainer exits with code 3 "
        "(it saved a checkpoint after SIGUSR1/SIGTERM) and resumes from <save_dir>.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe name of any stage (xomni train --help lists them), e.g. tiny_pt, xomni_7b_pt1")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides, e.g. parallel.tensor_parallel=4 save_dir=/ckpt/run1")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, required=True, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help=f"GPUs per node = ranks per node (default {DEFAULT_GPUS_PER_NODE})")
    g.add_argument("--ranks-per-node", type=int, default=None, metavar="K",
                   help="CPU job: K ranks per node, no GPUs requested (gloo backend)")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per node for the job (default: K on CPU jobs, whole nodes on GPU jobs)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--time", default="04:00:00", metavar="HH:MM:SS",
                   help="time limit per attempt (default %(default)s); the job requeues itself to go on")
    g.add_argument("--signal-lead", type=int, default=120, metavar="SECONDS",
                   help="send SIGUSR1 this long before the time limit so the trainer can save "
                   "(default %(default)s)")
    g.add_argument("--max-requeues", type=int, default=100,
                   help="stop requeueing after this many requeues (default %(default)s)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                   help="extra sbatch option written into the script, repeatable; use the = form: "
                   "--sbatch-arg=--mem=0 --sbatch-arg=--qos=high")
    o = p.add_argument_group("output")
    o.add_argument("--dry-run", action="store_true",
                   help="print the rendered script and the sbatch command; submit nothing, write nothing")
    o.add_argument("--run-dir", type=Path, default=None,
                   help="where the script and logs go (default <save_dir>/slurm)")
    a = p.add_argument_group("advanced")
    a.add_argument("--entry", default="megatron_xomni.train", metavar="MODULE",
                   help="module each rank runs with python -m (default %(default)s)")
    a.add_argument("--recipe-loader", default="megatron_xomni.recipes:load_recipe",
                   metavar="MODULE:FUNC",
                   help="function(name, overrides) -> a stage's run config (default %(default)s)")
    a.add_argument("--python", default=sys.executable,
                   help="Python on the compute nodes (default: this one, %(default)s)")
    return p


def _seconds(limit: str) -> int:
    """SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds."""
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # after a day count the first field is hours
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def spec_from_args(args: argparse.Namespace) -> tuple[JobSpec, Any]:
    if args.nodes < 1:
        raise SubmitError(f"--nodes {args.nodes}: need at least 1 node")
    if args.ranks_per_node is not None:
        if args.gpus_per_node:
            raise SubmitError("--ranks-per-node is for CPU jobs: drop --gpus-per-node (or use it alone)")
        if args.ranks_per_node < 1:
            raise SubmitError(f"--ranks-per-node {args.ranks_per_node}: need at least 1")
        gpus, nproc = 0, args.ranks_per_node
        cpus = args.cpus_per_task if args.cpus_per_task is not None else nproc
    else:
        gpus = DEFAULT_GPUS_PER_NODE if args.gpus_per_node is None else args.gpus_per_node
        if gpus < 1:
            raise SubmitError(f"--gpus-per-node {gpus}: use --ranks-per-node K for a CPU job")
        nproc, cpus = gpus, args.cpus_per_task
    if not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", args.time):
        raise SubmitError(f"--time {args.time!r}: use HH:MM:SS, MM or D-HH:MM:SS")
    if args.signal_lead < 10:
        raise SubmitError(f"--signal-lead {args.signal_lead}: give the trainer at least 10 s to save")
    if _seconds(args.time) <= args.signal_lead:
        raise SubmitError(f"--time {args.time} is not longer than --signal-lead {args.signal_lead} s: "
                          "raise --time or lower --signal-lead")
    for o in args.overrides:
        if "=" not in o:
            raise SubmitError(f"override {o!r} is not key=value")
        if any(ord(c) < 32 or ord(c) == 127 for c in o):
            raise SubmitError(f"override {o!r} holds a control character (a newline?): remove it")

    if not _distributed(args.recipe_loader, args.recipe, args.overrides):
        if args.nodes != 1:
            raise SubmitError(f"recipe {args.recipe} runs as one process that starts its own workers: use --nodes 1")
        nproc = 1  # its workers use the node's CPUs / GPUs
    world = args.nodes * nproc
    cfg = load_and_validate(args.recipe_loader, args.recipe, args.overrides, world, gpu_job=gpus > 0)
    name = str(cfg.name)
    if not _NAME_OK.match(name):
        raise SubmitError(f"run name {name!r}: use letters, digits and _.+- only (it names files)")
    # A relative save_dir is relative to the job's working directory: where this command runs.
    run_dir = args.run_dir or (Path.cwd() / str(cfg.save_dir) / "slurm")
    spec = JobSpec(
        recipe=args.recipe, overrides=list(args.overrides), job_name=name, nodes=args.nodes,
        nproc_per_node=nproc, gpus_per_node=gpus, run_dir=run_dir.resolve(),
        time_limit=args.time, signal_lead=args.signal_lead, partition=args.partition,
        account=args.account, cpus_per_task=cpus, max_requeues=args.max_requeues,
        sbatch_args=list(args.sbatch_arg), entry_module=args.entry, python=args.python,
    )
    return spec, cfg


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    # intermixed: options may follow the key=value overrides
    args = parser.parse_intermixed_args(argv)
    try:
        spec, cfg = spec_from_args(args)
        script = render(spec)
    except SubmitError as e:
        print(f"xomni submit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    command = ["sbatch", "--parsable", str(spec.script_path)]
    if args.dry_run:
        print(script)
        print(f"# would run: {shlex.join(command)}")
        return 0
    if shutil.which("sbatch") is None:
        print("xomni submit: error: sbatch is not on PATH (use --dry-run to only render the script)",
              file=sys.stderr)
        return EXIT_USAGE
    spec.log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the log folder
    spec.script_path.write_text(script)
    spec.script_path.chmod(0o755)
    res = subprocess.run(command, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"xomni submit: sbatch failed ({res.returncode}): {res.stderr.strip()}", file=sys.stderr)
        return res.returncode
    job_id = res.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    print(job_id)
    print(f"submitted {spec.job_name} as job {job_id}: {spec.world_size} ranks "
          f"({spec.nodes} x {spec.nproc_per_node}); script {spec.script_path}; "
          f"log {spec.log_dir}/{spec.job_name}-{job_id}.out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`xomni submit`: submit any recipe of any stage to SLURM.

Loads the recipe with its overrides and checks its layout and types against the world size the
job will have (nodes x GPUs, or nodes x ranks on CPU) *before* anything is submitted - not its
local paths, which are checked when the job starts (so a recipe can be rendered before its inputs
exist). Renders the package's train.sbatch into the run folder (<save_dir>/slurm/<name>.sbatch)
and submits it with `sbatch --parsable`. The job id is the only thing printed on stdout. GPU jobs
are validated as running where Transformer Engine is installed (context parallelism needs it).
Stages that run as one process (corpus tokenization, the text tokenizer) get one node and one rank.
Every value written into the script is validated or shell-quoted: no value can add a line.

Array mode (`array_spec`, used by `xomni scaling launch --slurm`): ONE job array over many runs of
one resource shape, `#SBATCH --array=<indices>`, the same template and checks. Every run's recipe
and overrides are loaded and validated for the world size before anything is submitted; each
element runs `python -m ENTRY FILE` and picks its run from FILE by $SLURM_ARRAY_TASK_ID, so no
run's values are written into the script at all. Logs are <run_dir>/logs/<name>-<array id>_<index>.out.

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
    array: Optional[str] = None
    """Job array indices (sbatch --array syntax: 0-11, 1,3-5, 0-11%4): one element per run."""

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
_ARRAY = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*(%\d+)?$")


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
    if spec.array is not None and not _ARRAY.match(spec.array):
        raise SubmitError(f"job array indices {spec.array!r}: use sbatch's --array form, e.g. 0-11, 1,3-5 or 0-11%4")
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
        "array_directive": f"#SBATCH --array={spec.array}" if spec.array else "# (not a job array)",
        # %A_%a: array job id and element index, one log per element
        "log_pattern": "%x-%A_%a" if spec.array else "%x-%j",
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


def add_resource_args(p: argparse.ArgumentParser, nodes_required: bool = True) -> None:
    """The resource options (nodes, ranks, partition, time, ...), shared with `xomni scaling launch`."""
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, required=nodes_required, default=None, help="number of nodes")
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
    g.add_argument("--python", default=sys.executable,
                   help="Python on the compute nodes (default: this one, %(default)s)")


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
    add_resource_args(p)
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


def _resources(args: argparse.Namespace) -> tuple[int, int, Optional[int]]:
    """(GPUs per node, ranks per node, CPUs per task) from the resource options, checked."""
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
    return gpus, nproc, cpus


def _check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        if "=" not in o:
            raise SubmitError(f"override {o!r} is not key=value")
        if any(ord(c) < 32 or ord(c) == 127 for c in o):
            raise SubmitError(f"override {o!r} holds a control character (a newline?): remove it")


def _spec(args: argparse.Namespace, gpus: int, nproc: int, cpus: Optional[int], **fields) -> JobSpec:
    return JobSpec(nodes=args.nodes, nproc_per_node=nproc, gpus_per_node=gpus, time_limit=args.time,
                   signal_lead=args.signal_lead, partition=args.partition, account=args.account,
                   cpus_per_task=cpus, max_requeues=args.max_requeues, sbatch_args=list(args.sbatch_arg),
                   python=args.python, **fields)


def spec_from_args(args: argparse.Namespace) -> tuple[JobSpec, Any]:
    gpus, nproc, cpus = _resources(args)
    _check_overrides(args.overrides)
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
    spec = _spec(args, gpus, nproc, cpus, recipe=args.recipe, overrides=list(args.overrides), job_name=name,
                 run_dir=run_dir.resolve(), entry_module=args.entry)
    return spec, cfg


def array_indices(indices: list[int], max_parallel: Optional[int] = None) -> str:
    """sbatch --array text for these element indices: runs of consecutive ones as ranges (1,3-5)."""
    if not indices or any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise SubmitError(f"job array indices {indices}: need distinct indices >= 0")
    parts, xs = [], sorted(indices)
    start = prev = xs[0]
    for i in xs[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    if max_parallel is not None and max_parallel < 1:
        raise SubmitError(f"--max-parallel {max_parallel}: need at least 1")
    return ",".join(parts) + (f"%{max_parallel}" if max_parallel else "")


def array_spec(args: argparse.Namespace, runs: list[tuple[str, list[str]]], indices: list[int], *,
               job_name: str, run_dir: Path, entry_module: str, entry_file: Path,
               max_parallel: Optional[int] = None, world_size: Optional[int] = None,
               recipe_loader: str = "megatron_xomni.recipes:load_recipe") -> JobSpec:
    """One job array whose element i runs `python -m entry_module entry_file` and picks its run from
    entry_file by $SLURM_ARRAY_TASK_ID. `runs` holds (recipe, overrides) of every element in
    `indices`; each is loaded and validated for the job's world size first (SubmitError otherwise).
    `args` carries the resource options (`add_resource_args`); `world_size`: the one the runs were
    planned for, refused when the resources give another."""
    gpus, nproc, cpus = _resources(args)
    if world_size is not None and args.nodes * nproc != world_size:
        raise SubmitError(f"the runs were planned and validated for world size {world_size}, not "
                          f"{args.nodes * nproc} ({args.nodes} node(s) x {nproc} ranks): request "
                          f"{world_size} ranks per element, or plan them again for {args.nodes * nproc}")
    if not _NAME_OK.match(job_name):
        raise SubmitError(f"job name {job_name!r}: use letters, digits and _.+- only (it names files)")
    if len(runs) != len(indices):
        raise SubmitError(f"{len(runs)} runs for {len(indices)} array indices")
    for recipe, overrides in runs:
        _check_overrides(overrides)
        if not _distributed(recipe_loader, recipe, overrides):
            raise SubmitError(f"recipe {recipe} runs as one process: it cannot be a job array element")
        load_and_validate(recipe_loader, recipe, overrides, args.nodes * nproc, gpu_job=gpus > 0)
    return _spec(args, gpus, nproc, cpus, recipe=str(entry_file), overrides=[], job_name=job_name,
                 run_dir=Path(run_dir).resolve(), entry_module=entry_module,
                 array=array_indices(indices, max_parallel))


def submit_spec(spec: JobSpec, dry_run: bool, files: Optional[dict[Path, str]] = None,
                prog: str = "xomni submit") -> int:
    """Render and submit `spec` (print the script instead when `dry_run`); `files` are written next
    to the script first (e.g. the frozen run list of a job array), never in a dry run. Prints the
    job id on stdout; returns the exit code."""
    try:
        script = render(spec)
    except SubmitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    command = ["sbatch", "--parsable", str(spec.script_path)]
    if dry_run:
        print(script)
        print(f"# would run: {shlex.join(command)}")
        return 0
    if shutil.which("sbatch") is None:
        print(f"{prog}: error: sbatch is not on PATH (use --dry-run to only render the script)",
              file=sys.stderr)
        return EXIT_USAGE
    spec.log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the log folder
    for path, text in (files or {}).items():
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    spec.script_path.write_text(script)
    spec.script_path.chmod(0o755)
    res = subprocess.run(command, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"{prog}: sbatch failed ({res.returncode}): {res.stderr.strip()}", file=sys.stderr)
        return res.returncode
    job_id = res.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    print(job_id)
    log = f"{spec.job_name}-{job_id}_<index>.out" if spec.array else f"{spec.job_name}-{job_id}.out"
    what = f"array {spec.array} of {spec.world_size}-rank jobs" if spec.array else f"{spec.world_size} ranks"
    print(f"submitted {spec.job_name} as job {job_id}: {what} ({spec.nodes} x {spec.nproc_per_node}); "
          f"script {spec.script_path}; log {spec.log_dir}/{log}", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    # intermixed: options may follow the key=value overrides
    args = parser.parse_intermixed_args(argv)
    try:
        spec, _ = spec_from_args(args)
    except SubmitError as e:
        print(f"xomni submit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return submit_spec(spec, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())

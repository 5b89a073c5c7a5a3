"""`xomni scaling plan|launch|collect|fit|tiny`: scaling-law experiments.

    xomni scaling plan tiny_pt data.blend='["runs/data/world"]' --out runs/sweep \\
        --depths 2,3,4,6 --budgets 2e11,5e11,1.2e12           # iso-FLOP design
    xomni scaling plan tiny_pt ... --depths 2,4 --tokens 1e5,3e5,1e6   # sizes x tokens design
    xomni scaling launch runs/sweep                             # locally, one run after another
    xomni scaling launch runs/sweep --slurm --nodes 1 --gpus-per-node 8 [--dry-run]   # one job array
    xomni scaling collect runs/sweep                            # -> runs/sweep/runs.csv
    xomni scaling fit runs/sweep/runs.csv                       # -> runs/sweep/fit/summary.md + plots
    xomni scaling tiny --out runs/scaling_tiny                  # `make scaling`: all of it on CPU

A sweep is a folder holding sweep.json (every run's recipe, overrides and expected N, D, C) and
runs/<run>/ (each run's checkpoints and metrics). N is the non-embedding parameter count.
Bad plans and inputs are refused in one line (exit code 2) before anything runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_xomni.scaling.plan import PlanError, PlanRequest, parse_numbers, sweep_path

EXIT_USAGE = 2


def _plan_parser(sub):
    p = sub.add_parser("plan", help="write a sweep file: budgets x sizes (iso-FLOP) or sizes x tokens")
    p.add_argument("recipe", help="base AR recipe of every run, e.g. tiny_pt")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides for every run (data.blend=..., parallel.tensor_parallel=2, ...)")
    p.add_argument("--out", required=True, help="sweep folder (sweep.json, runs/<run>/)")
    p.add_argument("--depths", required=True, help="family depths, e.g. 2,3,4,6")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budgets", help="training FLOPs per run (iso-FLOP design): 1e12,2e12,4e12 or 1e12:4e12:3")
    g.add_argument("--tokens", help="training tokens per run (sizes x tokens design): 1e5,3e5,1e6")
    p.add_argument("--family", action="append", default=[], metavar="FIELD=VALUE",
                   help="a ModelFamily rule, repeatable: aspect_ratio=32, head_dim=16, lr_ref=1e-3, "
                   "batch_coeff=0.292 (see megatron_xomni/scaling/family.py)")
    p.add_argument("--ranks", type=int, default=1, help="world size of every run (default 1)")
    p.add_argument("--image-fraction", type=float, default=None,
                   help="share of image targets for the FLOP count (default: measured from data.blend)")
    p.add_argument("--evals", type=int, default=4, help="validation evaluations per run (default 4; the last at the final step)")
    p.add_argument("--eval-iters", type=int, default=4, help="validation batches per evaluation (default 4)")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup as a fraction of each run's steps (default 0.05)")
    p.add_argument("--name", default=None, help="sweep name (default: the --out folder's name)")
    p.add_argument("--force", action="store_true", help="replace an existing sweep file")
    return p


def _launch_parser(sub):
    from megatron_xomni.slurm.submit import add_resource_args

    p = sub.add_parser("launch", help="run the sweep's unfinished runs (locally, or one SLURM job array)")
    p.add_argument("sweep", help="sweep folder or sweep.json")
    p.add_argument("--ranks", type=int, default=None, help="local: ranks per run (default: the sweep's world size)")
    p.add_argument("--torchrun", action="store_true", help="local: start each run under torchrun, even with one rank")
    p.add_argument("--slurm", action="store_true", help="submit one job array instead of running here")
    p.add_argument("--dry-run", action="store_true", help="--slurm: print the script, submit and write nothing")
    p.add_argument("--max-parallel", type=int, default=None, help="--slurm: at most this many elements at once")
    add_resource_args(p, nodes_required=False)  # xomni submit's own resource options, for --slurm
    return p


def _collect_parser(sub):
    p = sub.add_parser("collect", help="one CSV of the sweep's runs (losses, N, D, C, times, config)")
    p.add_argument("sweep", help="sweep folder or sweep.json")
    p.add_argument("--out", default=None, help="CSV path (default <sweep folder>/runs.csv)")
    p.add_argument("--tail", type=float, default=0.5, help="smoothing: the last share of training (default 0.5)")
    return p


def _fit_parser(sub):
    p = sub.add_parser("fit", help="fit text and image loss laws; write summary.md and plots")
    p.add_argument("table", help="CSV from xomni scaling collect")
    p.add_argument("--out", default=None, help="output folder (default <table folder>/fit)")
    p.add_argument("--loss", choices=["final", "smoothed"], default="final",
                   help="validation loss at the final step, or smoothed over the tail (default final)")
    p.add_argument("--budget", type=float, default=None,
                   help="FLOPs to predict the optimum and loss at (default 10x the largest run)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    p.add_argument("--bootstrap-starts", type=int, default=4,
                   help="approach 3: extra L-BFGS-B starts per resample from its own best grid points "
                   "(default 4; 0 restarts only from the point estimate, ~3x faster, but a resample whose "
                   "optimum lies elsewhere, e.g. off an exponent at its bound, is then not found)")
    p.add_argument("--confidence", type=float, default=0.9, help="interval level (default 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default=None)
    return p


def _tiny_parser(sub):
    p = sub.add_parser("tiny", help="a real sweep on the built-in world corpus on CPU (make scaling)")
    p.add_argument("--out", default="runs/scaling_tiny", help="output folder (default %(default)s)")
    p.add_argument("--demo", default="runs/demo", help="demo folder whose tokens/ are reused if complete")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (3 x 3, tiny budgets) for smoke runs")
    return p


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `xomni scaling` parser and its subcommands' parsers."""
    parser = argparse.ArgumentParser(prog="xomni scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs = {name: add(sub) for name, add in (("plan", _plan_parser), ("launch", _launch_parser),
                                             ("collect", _collect_parser), ("fit", _fit_parser),
                                             ("tiny", _tiny_parser))}
    return parser, subs


# ---- commands ---------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    from megatron_xomni.scaling.plan import plan, write_sweep

    path = Path(args.out) / "sweep.json"
    if path.exists() and not args.force:
        raise PlanError(f"{path} exists: launch it, or pass --force to replace it (a run folder in "
                        f"{Path(args.out) / 'runs'} is then used only if its saved config is the new plan's)")
    req = PlanRequest(
        recipe=args.recipe, out=args.out, depths=parse_numbers(args.depths, "--depths", integer=True),
        budgets=parse_numbers(args.budgets, "--budgets") if args.budgets else None,
        tokens=parse_numbers(args.tokens, "--tokens") if args.tokens else None,
        overrides=list(args.overrides), family=list(args.family), world_size=args.ranks,
        image_fraction=args.image_fraction, evals=args.evals, eval_iters=args.eval_iters,
        warmup_fraction=args.warmup, name=args.name)
    sweep = plan(req)
    write_sweep(sweep, path)
    print(f"[scaling] wrote {path}: {len(sweep['runs'])} runs ({sweep['design']} design, image fraction "
          f"{sweep['image_fraction']:.3f}, {sweep['image_fraction_source']})")
    if sweep["design"] == "isoflop" and len(req.depths) == 3:
        print("[scaling] note: 3 sizes per budget fit approach 2's parabolas but give it zero-width bootstrap "
              "intervals (a resample must keep all 3 sizes); 4 or more sizes give intervals")
    for r in sweep["runs"]:
        print(f"  {r['name']:>14}: N={r['params']:.3g} D={r['tokens']:.3g} C={r['flops']:.3g} "
              f"steps={r['steps']} batch={r['global_batch_size']}x{r['seq_length']} lr={r['lr']:.3g}")
    return 0


def cmd_launch(args) -> int:
    from megatron_xomni.scaling.launch import launch_local, launch_slurm
    from megatron_xomni.scaling.plan import read_sweep

    sweep = read_sweep(args.sweep)
    if not args.slurm:
        if args.dry_run or args.max_parallel is not None or args.nodes is not None:
            raise PlanError("--dry-run, --max-parallel and the resource options (--nodes, ...) are for --slurm")
        ranks = args.ranks or sweep["world_size"]
        return launch_local(sweep, ranks, in_process=False if args.torchrun else None)
    if args.nodes is None:
        raise PlanError("--slurm needs --nodes (and --gpus-per-node G or --ranks-per-node K)")
    if args.ranks is not None or args.torchrun:
        raise PlanError("--ranks and --torchrun are for local launches: with --slurm the ranks are "
                        "--nodes x --gpus-per-node (or --ranks-per-node)")
    return launch_slurm(sweep, sweep_path(args.sweep), args, args.dry_run, args.max_parallel)


def cmd_collect(args) -> int:
    from megatron_xomni.scaling.collect import collect, write_table
    from megatron_xomni.scaling.plan import read_sweep

    sweep = read_sweep(args.sweep)
    rows = collect(sweep, args.tail)
    out = Path(args.out) if args.out else sweep_path(args.sweep).parent / "runs.csv"
    write_table(rows, out)
    done = sum(r["status"] == "finished" for r in rows)
    print(f"[scaling] wrote {out}: {len(rows)} runs, {done} finished"
          + (f", {len(rows) - done} not finished (left out of fits)" if done < len(rows) else ""))
    return 0


LOSS_COLUMNS = {"final": ("text_loss", "image_loss"), "smoothed": ("text_loss_smoothed", "image_loss_smoothed")}


def fit_notes(loss: str, rows: list[dict], left_out: int) -> list[str]:
    return [
        f"N = non-embedding parameters (all but the input embedding tables; the output heads count); "
        f"D = training tokens (steps x batch x sequence length); C = model FLOPs counted by the trainer "
        f"(6N-style + attention, models/xomni/flops.py); L = validation loss ({loss}: "
        + ("at the final step" if loss == "final" else "smoothed over the end of training") + ", nats per target token).",
        f"{len(rows)} finished runs" + (f"; {left_out} unfinished runs left out" if left_out else "") + ".",
    ]


def fit_report(table, out, loss: str = "final", budget: Optional[float] = None, n_bootstrap: int = 200,
               confidence: float = 0.9, seed: int = 0, title: Optional[str] = None,
               bootstrap_starts: int = 4) -> tuple[dict, list[Path]]:
    """Fit text and image loss of a collected table; write summary.md and plots into `out`."""
    from megatron_xomni.scaling.collect import read_table
    from megatron_xomni.scaling.fit import compute_relation, fit_table, runs_from_table
    from megatron_xomni.scaling.report import write_report

    rows = read_table(table)
    finished = [r for r in rows if r.get("status") == "finished"]
    if not finished:
        raise ValueError(f"{table} has no finished runs: launch the sweep first")
    cols = LOSS_COLUMNS[loss]
    fits = fit_table(finished, cols, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed,
                     bootstrap_starts=bootstrap_starts)
    runs, _ = runs_from_table(finished, cols[0])
    fpt = compute_relation(runs)
    budget = budget or 10.0 * max(r.flops for r in runs)
    names = {c: c.replace("_smoothed", "") for c in cols}
    fits = {names[c]: f for c, f in fits.items()}
    for c, f in fits.items():
        f.column = c
    paths = write_report(fits, out, budget, fpt, title or f"Scaling-law fit: {Path(table).parent.name}",
                         fit_notes(loss, finished, len(rows) - len(finished)))
    return fits, paths


def cmd_fit(args) -> int:
    out = Path(args.out) if args.out else Path(args.table).parent / "fit"
    if not (args.bootstrap >= 1 and args.bootstrap_starts >= 0 and 0 < args.confidence < 1
            and (args.budget is None or args.budget > 0)):
        raise PlanError("use --bootstrap >= 1, --bootstrap-starts >= 0, --confidence in (0, 1) and a positive --budget")
    fits, paths = fit_report(args.table, out, args.loss, args.budget, args.bootstrap, args.confidence,
                             args.seed, args.title, args.bootstrap_starts)
    for col, f in fits.items():
        a3, a2 = f.approach3, f.approach2
        line = (f"[scaling] {col}: alpha {a3.alpha}, beta {a3.beta}, N_opt ∝ C^a with a = "
                f"{a3.params_exponent} (approach 3)")
        line += f", {a2.a} (approach 2)" if a2 is not None else f"; approach 2: {f.approach2_note}"
        print(line)
    print(f"[scaling] wrote {', '.join(str(p) for p in paths)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    if not argv or argv[0] not in subs:
        parser.parse_args(argv)  # --help, or the one-line usage error for an unknown command
        parser.print_help()
        return EXIT_USAGE
    # intermixed: plan's options may follow its key=value overrides (not possible through subparsers)
    sub = subs[argv[0]]
    args = sub.parse_intermixed_args(argv[1:]) if argv[0] == "plan" else sub.parse_args(argv[1:])
    args.command = argv[0]
    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "launch":
            return cmd_launch(args)
        if args.command == "collect":
            return cmd_collect(args)
        if args.command == "fit":
            return cmd_fit(args)
        from megatron_xomni.scaling.tiny import main as tiny_main

        return tiny_main(args.out, args.demo, args.quick)
    except (ValueError, FileNotFoundError) as e:  # PlanError, SubmitError-turned-PlanError, LayoutError
        print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

"""`xomni demo [--out DIR] [--smoke]`: run the tiny end-to-end pipeline (resumable)."""

from __future__ import annotations

import argparse

from megatron_xomni.demo import stages
from megatron_xomni.demo.runner import DemoConfig, Stage, run_demo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="xomni demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output folder (rerun the same command to resume)")
    p.add_argument("--smoke", action="store_true", help="a shortened run (CI): every stage, tiny sizes")
    p.add_argument("--stages", default=",".join(stages.ALL), help="comma-separated subset, in order")
    args = p.parse_args(argv)
    cfg = DemoConfig.smoke(args.out) if args.smoke else DemoConfig(out=args.out)
    names = [s for s in args.stages.split(",") if s]
    unknown = [s for s in names if s not in stages.ALL]
    if unknown:
        p.error(f"unknown stage(s) {unknown}: choose from {stages.ALL}")
    run_demo(cfg, [Stage(n, getattr(stages, n)) for n in names])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

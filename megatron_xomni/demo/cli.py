"""`xomni demo [--out DIR] [--smoke] [--publish DIR] [--seeds 0,1,2] [--set KEY=VALUE]`: run the tiny
end-to-end pipeline (resumable; --set overrides a DemoConfig size or knob, e.g. grpo_lr=3e-4).

`--seeds` (not part of `make demo`) runs the whole pipeline once per pipeline seed, in
`<out>/seed<N>`, and writes the mean and min-max of every target figure to `<out>/spread.md`
(+ spread.json). `--publish DIR` copies the report (report.md, curves.png, sample grids, eval.json,
figures.json) into DIR, e.g. reports/tiny_demo; with `--seeds` it writes the spread section into
DIR/report.md (a later single-seed publish keeps that section).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields, replace
from pathlib import Path

from megatron_xomni.demo import stages
from megatron_xomni.demo.runner import DemoConfig, Stage, run_demo

SPREAD_HEADING = "## Spread over pipeline seeds"
PUBLISHED = ["report.md", "curves.png", "figures.json", "eval_sft/eval.json", "eval_sft/samples.png",
             "eval_grpo/eval.json", "eval_grpo/samples.png", "demo_config.json"]


def _spread_section(text: str) -> str:
    return text[text.index(SPREAD_HEADING):] if SPREAD_HEADING in text else ""


def publish(run: Path, dest: Path, spread: str = "") -> None:
    """Copy the run's report files into `dest`; the spread section: `spread`, else the one already there."""
    dest.mkdir(parents=True, exist_ok=True)
    old = (dest / "report.md").read_text() if (dest / "report.md").exists() else ""
    for name in PUBLISHED:
        if (run / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / name, dest / name)
    section = spread or _spread_section(old)
    if section:
        text = (dest / "report.md").read_text()
        text = text[: text.index(SPREAD_HEADING)] if SPREAD_HEADING in text else text
        (dest / "report.md").write_text(text.rstrip() + "\n\n" + section)


def run_seeds(cfg: DemoConfig, seeds: list[int], names: list[str]) -> tuple[Path, str]:
    from megatron_xomni.demo.report import render_spread

    root = Path(cfg.out)
    figures = []
    for s in seeds:
        run_demo(replace(cfg, out=str(root / f"seed{s}"), seed=s), [Stage(n, getattr(stages, n)) for n in names])
        figures.append(json.loads((root / f"seed{s}" / "figures.json").read_text()))
    text = render_spread(seeds, figures).replace("# Spread over pipeline seeds", SPREAD_HEADING, 1)
    (root / "spread.md").write_text(text)
    (root / "spread.json").write_text(json.dumps({"seeds": seeds, "figures": figures}, indent=2))
    return root / f"seed{seeds[0]}", text


def _overrides(items: list[str]) -> dict:
    """["grpo_lr=3e-4", ...] -> {field: typed value} (ValueError naming the bad item)."""
    types = {f.name: f.type for f in fields(DemoConfig)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in types or key == "out":
            raise ValueError(f"--set {item!r}: use KEY=VALUE with KEY one of {', '.join(k for k in types if k != 'out')}")
        kind = types[key] if isinstance(types[key], str) else types[key].__name__
        try:
            if kind == "bool":
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = text.lower() in ("true", "1")
            else:
                out[key] = {"int": int, "float": float}.get(kind, str)(text)
        except ValueError:
            raise ValueError(f"--set {item!r}: {key} takes a {kind}") from None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="xomni demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (rerun the same command to resume)")
    p.add_argument("--smoke", action="store_true", help="a shortened run (CI): every stage, tiny sizes")
    p.add_argument("--stages", default=",".join(stages.ALL), help="comma-separated subset, in order")
    p.add_argument("--seeds", default=None, help="comma-separated pipeline seeds, e.g. 0,1,2: one whole pipeline each")
    p.add_argument("--publish", default=None, help="copy the report into this folder (e.g. reports/tiny_demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DemoConfig size or knob, e.g. --set grpo_lr=3e-4 --set grpo_shared_decoder_seed=false")
    args = p.parse_args(argv)
    cfg = DemoConfig.smoke(args.out) if args.smoke else DemoConfig(out=args.out)
    try:
        cfg = replace(cfg, **_overrides(args.set))
    except ValueError as e:
        p.error(str(e))
    names = [s for s in args.stages.split(",") if s]
    unknown = [s for s in names if s not in stages.ALL]
    if unknown:
        p.error(f"unknown stage(s) {unknown}: choose from {stages.ALL}")
    if args.seeds is not None:
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            p.error(f"--seeds {args.seeds!r}: give comma-separated non-negative integers, e.g. 0,1,2")
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            p.error(f"--seeds {args.seeds!r}: give distinct non-negative integers, e.g. 0,1,2")
        if "report" not in names:
            p.error("--seeds needs the report stage (it reads each seed's figures.json)")
        first, spread = run_seeds(cfg, seeds, names)
        if args.publish:
            publish(first, Path(args.publish), spread)
        return 0
    run_demo(cfg, [Stage(n, getattr(stages, n)) for n in names])
    if args.publish:
        publish(Path(cfg.out), Path(args.publish))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

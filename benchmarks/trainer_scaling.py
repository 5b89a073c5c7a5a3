#!/usr/bin/env python
"""Tiny pre-training throughput at DP=1 vs DP=2 on CPU, and checkpoint save/load times.

  python benchmarks/trainer_scaling.py [--iters 40]

Runs the real trainer (torchrun, gloo) on synthetic token data, both layouts on the same data and
global batch, and reads the trainer's own logs: median tokens/s over the steady-state window, the
time of each checkpoint save, and the resume (load) time of a restarted run.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_xomni.parallel.init import free_port


def run(nproc, root, save, iters, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "megatron_xomni.train", "tiny_pt", f'data.blend=["{root}/syn"]', f"data.cache_dir={root}/cache",
           f"save_dir={root}/{save}", f"steps={iters}", "log_interval=5", f"save_interval={iters // 2}",
           "data.global_batch_size=16", "data.micro_batch_size=8", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": str(2 // nproc), **__import__("os").environ})
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return out.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=40)
    args = p.parse_args()
    from megatron_xomni.data.synthetic_tokens import write_synthetic_tokens

    root = Path(tempfile.mkdtemp())
    write_synthetic_tokens(root / "syn", 2000, 512, 256, seed=0)
    results = {}
    for nproc in (1, 2):
        log = run(nproc, root, f"dp{nproc}", args.iters)
        recs = [json.loads(l) for l in (root / f"dp{nproc}" / "metrics.jsonl").read_text().splitlines()]
        tps = statistics.median(r["throughput_tokens_per_s"] for r in recs[1:])
        saves = [float(x) for x in re.findall(r"saved checkpoint .* in ([0-9.]+)s", log)]
        results[nproc] = {"tokens_per_s": tps, "save_s": saves}
    log = run(2, root, "dp2", args.iters + 10)  # resume the DP=2 run
    load = float(re.search(r"resumed from .*\(([0-9.]+)s\)", log).group(1))
    print(f"DP=1: {results[1]['tokens_per_s']:,.0f} tokens/s | DP=2: {results[2]['tokens_per_s']:,.0f} tokens/s | "
          f"speed-up {results[2]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x on 2 cores")
    print(f"checkpoint save (s): DP=1 {results[1]['save_s']}, DP=2 {results[2]['save_s']}; load on resume: {load:.2f}s")


if __name__ == "__main__":
    main()

"""The GPU suite's dry run (benchmarks/gpu/suite.py --dry-run): the whole script on the CPU, tiny sizes.

Every section must finish (Transformer Engine is reported as skipped, with the reason), and the
derived figures must follow from the measured ones and from formulas written here: the decode
roofline's bytes from flops.py's per-layer weight count, the KV cache from the config, MFU from
flops.model_flops of the batch the suite trains on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "suite.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/suite.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MFU" in proc.stdout and "roofline" in proc.stdout  # the table is printed last
    return json.loads(out.read_text())


def test_every_section_runs(result):
    for name in ("peaks", "decode", "train", "decoder"):
        assert result[name]["status"] == "ok", result[name]
    assert result["te"]["status"] == "skipped" and "64 MiB" in result["te"]["note"]
    assert result["env"]["dry_run"] is True


def test_derived_figures_follow_from_measurements_and_formulas(result):
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.flops import layer_matmul_weights, model_flops

    cfg = model_preset("tiny")
    s = result["env"]["sizes"]
    p, d, t = result["peaks"], result["decode"], result["train"]
    assert p["copy_bytes"] == 2 * s["copy_mib"] * 2 ** 20
    assert p["matmul_tflops"] > 0 and p["copy_tbs"] > 0

    qkv_bias = cfg.hidden_size + 2 * cfg.num_query_groups * cfg.kv_channels
    weights = 4 * (cfg.num_layers_total * (layer_matmul_weights(cfg) + qkv_bias) + cfg.image_vocab_size * cfg.hidden_size)
    kv_len = s["prompt"] + sum(s["steps"]) / 2
    kv = 4 * cfg.num_layers_total * 2 * s["batch"] * kv_len * cfg.num_query_groups * cfg.kv_channels
    assert d["bytes"]["weights"] == weights and d["bytes"]["kv_cache"] == pytest.approx(kv)
    assert d["roofline_s_measured_bw"] == pytest.approx((weights + kv) / (p["copy_tbs"] * 1e12))
    assert d["x_roofline_measured_bw"] == pytest.approx(d["step_s"] / d["roofline_s_measured_bw"])
    assert d["step_s"] > 0
    # Fixed-shape steps (on the CPU the graph's stand-in is the same eager static step).
    assert d["step_s_static"] > 0 and d["step_s_graph"] > 0
    assert d["graph_tokens_equal_static"] is True and d["static_tokens_agree_dynamic"] == 1.0
    assert d["x_roofline_nominal_bw_graph"] == pytest.approx(d["step_s_graph"] / d["roofline_s_nominal_bw"])
    r = d["rollout"]
    h, w = s["grid"]
    assert r["codes_ok"] and r["codes"] == h * w
    assert r["kv_cache_bytes"] == 4 * cfg.num_layers_total * 2 * s["batch"] * (s["prompt"] + h * w) * \
        cfg.num_query_groups * cfg.kv_channels

    rows, seq = s["micro_batch"] * s["micro_batches"], s["seq"]
    flops = model_flops(cfg, seq, image_positions=seq - (seq // 4 - 1), batch_size=rows)
    assert t["model_flops"] == pytest.approx(flops)
    assert t["mfu_nominal"] == pytest.approx(flops / t["step_s"] / 989e12)
    assert t["mfu_measured_peak"] == pytest.approx(flops / t["step_s"] / (p["matmul_tflops"] * 1e12))
    assert result["decoder"]["sec_per_image"] > 0 and result["decoder"]["image_px"] == [64, 64]

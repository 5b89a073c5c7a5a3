"""The CPU accommodations: pinned to the audited megatron-core version, inert with CUDA."""

import subprocess
import sys

from megatron_xomni import cpu_compat


def test_installed_megatron_core_is_the_audited_version():
    installed = cpu_compat.installed_megatron_core_version()
    assert installed == cpu_compat.CHECKED_MEGATRON_CORE_VERSION, (
        f"megatron-core {installed} is installed but megatron_xomni/cpu_compat.py was audited "
        f"against {cpu_compat.CHECKED_MEGATRON_CORE_VERSION}: re-check every call site it lists"
    )


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_apply_changes_nothing_when_cuda_is_available():
    # Pretend a GPU exists: apply() must not touch torch or megatron-core.
    out = _run(
        "import torch; torch.cuda.is_available = lambda: True\n"
        "cd = torch.cuda.current_device; sync = torch.cuda.synchronize\n"
        "from megatron_xomni import cpu_compat\n"
        "from megatron.core.tensor_parallel import random as r; tracker = r.CudaRNGStatesTracker\n"
        "print(cpu_compat.apply(), torch.cuda.current_device is cd, torch.cuda.synchronize is sync,"
        " r.CudaRNGStatesTracker is tracker, torch.overrides._get_current_function_mode() is None)"
    )
    assert out == "False True True True True"


def test_apply_on_cpu_redirects_cuda_requests():
    out = _run(
        "import torch\n"
        "from megatron_xomni import cpu_compat\n"
        "assert cpu_compat.apply()\n"
        "t = torch.zeros(2, device='cuda'); u = torch.ones(1).cuda()\n"
        "from megatron.core import tensor_parallel as tp\n"
        "from megatron.core.tensor_parallel import random as r\n"
        "r.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)\n"
        "with r.get_cuda_rng_tracker().fork(): a = torch.rand(3)\n"
        "torch.manual_seed(5 + 2718); b = torch.rand(3)\n"
        "print(t.device, u.device, torch.ones(1).type(), torch.equal(a, b))"
    )
    # The model-parallel stream is seeded exactly as megatron-core seeds it (seed + 2718 + tp_rank).
    assert out == "cpu cpu torch.cuda.FloatTensor True"

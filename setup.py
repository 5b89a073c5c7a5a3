"""megatron-xomni: the open training stack for X-Omni-style discrete AR image generation."""
from setuptools import find_packages, setup

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "numpy<2.5",
    "megatron-core==0.16.1",
    "psutil",  # megatron-core's async dist-ckpt writer hangs without it
    "einops",
    "transformers>=4.57",
    "safetensors",
    "sentencepiece",
    "tensorboard",
    "diffusers>=0.35",
    "pillow",
    "webdataset",
    "matplotlib",
    "scipy",  # scaling-law fits (L-BFGS-B, bounded scalar minimisation)
    "threadpoolctl",  # single-threaded BLAS in the fits (threaded OpenBLAS: 35x slower)
    "rapidocr",  # ships PP-OCR models in its wheel
    "opencv-python-headless",  # world detector
    "onnxruntime",
    "tqdm",
]

setup(
    name="megatron-xomni",
    version="0.1.0",
    description="Megatron-style training stack for X-Omni discrete autoregressive image generation",
    packages=find_packages(include=["megatron_xomni", "megatron_xomni.*"]),
    package_data={"megatron_xomni.slurm": ["train.sbatch", "rank_exit.sh"], "megatron_xomni.kernels": ["small_gemm.c", "decode_attention.c", "simd.h"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        # Benchmarks only (benchmarks/grpo_vs_trl.py): the peer GRPO trainer, never imported by the package.
        # Versions checked with torch 2.13.0 and transformers 5.24.0.
        "bench": ["trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0"],
        # GPU-only: installable only where CUDA exists.
        "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda120", "nvidia-nvimgcodec-cu12", "optree"],
    },
    entry_points={"console_scripts": ["xomni=megatron_xomni.cli:main"]},
)

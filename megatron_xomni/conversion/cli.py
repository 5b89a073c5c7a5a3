"""Convert checkpoints between Hugging Face and Megatron (any TP/PP: dist-ckpt reshards on load).

  # Qwen2.5 (HF) -> Megatron X-Omni model (adds image vocabulary + vision blocks)
  xomni convert hf-to-megatron --hf Qwen2.5-7B/ --out ckpt/xomni_init
  # released X-Omni weights (XOmniForCausalLM) -> Megatron
  xomni convert hf-to-megatron --hf X-Omni-En/ --out ckpt/xomni_sft
  # Megatron -> HF, in the Qwen2 or the X-Omni layout
  xomni convert megatron-to-hf --ckpt ckpt/run1 --out export/ --layout xomni
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="xomni convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF Qwen2/Qwen2.5 or XOmniForCausalLM -> Megatron dist-ckpt")
    a.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    a.add_argument("--out", required=True, help="Megatron checkpoint root to create")
    a.add_argument("--seed", type=int, default=0, help="seed of the new-parameter initialisation")
    a.add_argument("--vision-layers", type=int, nargs=2, default=(4, 4), metavar=("ADAPTER", "HEAD"),
                   help="vision blocks added before/after the LM stack (Qwen2 input only)")
    a.add_argument("--image-vocab-size", type=int, default=16384)
    a.add_argument("--image-table-size", type=int, default=16448)
    b = sub.add_parser("megatron-to-hf", help="Megatron dist-ckpt (any TP/PP) -> HF")
    b.add_argument("--ckpt", required=True, help="Megatron checkpoint root")
    b.add_argument("--out", required=True, help="HF folder to create")
    b.add_argument("--layout", choices=["qwen2", "xomni"], default="xomni")
    b.add_argument("--iteration", type=int, default=None, help="default: the latest")
    b.add_argument("--max-shard-gb", type=float, default=4.0)
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    args = p.parse_args(argv)

    import torch

    from megatron_xomni.conversion.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_xomni.conversion.hf_io import ConversionError
    from megatron_xomni.parallel import destroy_parallel

    try:
        if args.cmd == "hf-to-megatron":
            out = convert_hf_to_megatron(args.hf, args.out, args.seed, tuple(args.vision_layers),
                                         args.image_vocab_size, args.image_table_size)
        else:
            out = convert_megatron_to_hf(args.ckpt, args.out, args.layout, args.iteration,
                                         int(args.max_shard_gb * 2**30),
                                         getattr(torch, args.dtype) if args.dtype else None)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

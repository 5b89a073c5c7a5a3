"""Convert checkpoints between Hugging Face and Megatron (any TP/PP: dist-ckpt reshards on load).

  # Qwen2.5 (HF) -> Megatron X-Omni model (adds image vocabulary + vision blocks)
  xomni convert hf-to-megatron --hf Qwen2.5-7B/ --out ckpt/xomni_init
  # released X-Omni weights (XOmniForCausalLM) -> Megatron
  xomni convert hf-to-megatron --hf X-Omni-En/ --out ckpt/xomni_sft
  # Megatron -> HF, in the X-Omni layout (with what the released inference code reads) or Qwen2's
  xomni convert megatron-to-hf --ckpt ckpt/run1 --out export/run1 --layout xomni \\
      --text-tokenizer tok/ --image-tokenizer siglip_vq/ --decoder decoder/
  xomni convert megatron-to-hf --ckpt ckpt/run1 --out export/run1_qwen --layout qwen2

Every output carries xomni_conversion.json. --out must be new, empty, or an earlier output of the same
command (replaced only with --overwrite, crash-safely); it must not be or contain the source.
The text table is padded to a multiple of 128 rows on import and stripped on export; exports keep the
source's dtype and tied embeddings unless told otherwise.
"""

import argparse
import sys

EXIT_USAGE = 2


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
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: the dtype of the HF checkpoint the run started from")
    b.add_argument("--text-tokenizer", default=None, help="the run's text tokenizer folder (bos/eos ids)")
    b.add_argument("--image-tokenizer", default=None, help="the run's SigLIP-VQ folder (vision_config)")
    b.add_argument("--decoder", default=None, help="the run's diffusion decoder export (vision_config)")
    for s in (a, b):
        s.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command at --out")
    args = p.parse_args(argv)

    from megatron_xomni.conversion import ConversionError, outputs

    plan = None
    try:  # --out rules first: a refusal costs no heavy import and starts no process group
        if args.cmd == "hf-to-megatron":
            plan = outputs.prepare_megatron_root(args.out, args.hf, args.overwrite)
        else:
            outputs.check_hf_folder(args.out, args.ckpt, args.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    import torch

    from megatron_xomni.conversion.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_xomni.conversion.xomni_fields import RunParts
    from megatron_xomni.parallel import destroy_parallel

    try:
        if args.cmd == "hf-to-megatron":
            out = convert_hf_to_megatron(args.hf, args.out, args.seed, tuple(args.vision_layers),
                                         args.image_vocab_size, args.image_table_size, plan=plan)
        else:
            parts = RunParts(args.text_tokenizer, args.image_tokenizer, args.decoder)
            out = convert_megatron_to_hf(args.ckpt, args.out, args.layout, args.iteration,
                                         int(args.max_shard_gb * 2**30),
                                         getattr(torch, args.dtype) if args.dtype else None,
                                         overwrite=args.overwrite, parts=parts, require_vision=True)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        destroy_parallel()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

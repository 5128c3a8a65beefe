"""Convert a Hugging Face PIPO or Qwen3.5 checkpoint into an MLX PIPO model folder."""

import argparse
from typing import List, Optional

from ..conversion import DTYPES, convert
from ..heads import COMPRESSOR_TYPES
from . import run_cli


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Convert a PIPO checkpoint for MLX. SRC may be (a) a merged PIPO model, "
            "(b) a base Qwen3.5 model together with --adapter-path (a PEFT LoRA "
            "adapter, merged here), or (c) a plain Qwen3.5 model, which gets fresh "
            "PIPO heads to train with train_heads.py. SRC and ADAPTER are local "
            "folders or Hugging Face repo ids, optionally with a subfolder "
            "(e.g. AlbertTan/PIPO/outputs/Qwen3.5-4B/...). Layouts: docs/design.md §3."
        )
    )
    parser.add_argument("--hf-path", required=True, metavar="SRC", help="source model folder or repo id")
    parser.add_argument("--mlx-path", required=True, metavar="DST", help="output folder (must not exist)")
    parser.add_argument("--adapter-path", metavar="ADAPTER", help="PEFT LoRA adapter folder or repo id to merge")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default: the source's)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the linear layers and embeddings")
    parser.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=4, help="bits per weight (default 4)")
    parser.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64, help="quantization group size (default 64)")
    parser.add_argument(
        "--compressor-type",
        choices=list(COMPRESSOR_TYPES),
        help="compressor to create when SRC has none (default mlp); must match SRC's if it has one",
    )
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    return parser


def run(args: argparse.Namespace) -> None:
    dst = convert(
        args.hf_path,
        args.mlx_path,
        adapter_path=args.adapter_path,
        dtype=args.dtype,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        compressor_type=args.compressor_type,
        force=args.force,
    )
    print(f"[INFO] wrote {dst}")


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()

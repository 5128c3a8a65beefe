"""Fold a train_heads.py checkpoint (LoRA and heads) into a new PIPO model folder."""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import PipoError
from ..train_state import fuse
from . import run_cli


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Fuse a train_heads.py checkpoint into its model, as train_heads.py --fuse "
            "does at the end of a run: LoRA is merged into the weights it adapts and the "
            "trained heads replace the model's. A quantized model stays quantized as it "
            "was (the heads, trained in float, are quantized again) unless --dequantize "
            "(docs/design.md §6; docs/training.md)."
        )
    )
    p.add_argument("--model", required=True, help="the PIPO folder the run trained (its --model)")
    p.add_argument(
        "--adapter-path",
        required=True,
        help="the run's folder (its latest checkpoint) or one of its step-NNNNNNN folders",
    )
    p.add_argument(
        "--save-path", default="fused_model", help="the folder to write (default fused_model)"
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="write a quantized model unquantized, in the dtype of its quantization scales",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --save-path")
    return p


def run(args: argparse.Namespace) -> None:
    dst = Path(args.save_path).expanduser()
    if dst.exists() and dst.resolve() == Path(args.model).expanduser().resolve():
        raise PipoError("--save-path is the --model folder itself; choose another folder")
    if dst.exists() and not args.force:
        raise PipoError(f"{dst} already exists; choose another --save-path or pass --force")
    out = fuse(args.model, args.adapter_path, str(dst), args.dequantize)
    print(f"[INFO] fused model in {out}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()

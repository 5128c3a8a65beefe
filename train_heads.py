"""Train the PIPO heads (compressor, MTP, confidence) and LoRA on a converted model.

A thin wrapper; the code and `--help` are in pipo_mlx/cli/train.py.
"""

from pipo_mlx.cli.train import main

if __name__ == "__main__":
    main()

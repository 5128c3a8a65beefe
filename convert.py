"""Convert a Hugging Face PIPO or Qwen3.5 checkpoint into an MLX PIPO model folder.

A thin wrapper; the code and `--help` are in pipo_mlx/cli/convert.py.
"""

from pipo_mlx.cli.convert import main

if __name__ == "__main__":
    main()

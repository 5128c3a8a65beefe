"""`python -m pipo_mlx.convert`: convert a Hugging Face PIPO or Qwen3.5 checkpoint for MLX (see pipo_mlx/cli/convert.py)."""

from pipo_mlx.cli.convert import main

if __name__ == "__main__":
    main()

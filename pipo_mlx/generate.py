"""`python -m pipo_mlx.generate`: generate text with a PIPO model (see pipo_mlx/cli/generate.py)."""

from pipo_mlx.cli.generate import main

if __name__ == "__main__":
    main()

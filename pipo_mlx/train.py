"""`python -m pipo_mlx.train`: train the PIPO heads (see pipo_mlx/cli/train.py)."""

from pipo_mlx.cli.train import main

if __name__ == "__main__":
    main()

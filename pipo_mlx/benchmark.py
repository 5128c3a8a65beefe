"""`python -m pipo_mlx.benchmark`: measure a PIPO model against mlx-lm on its base (see pipo_mlx/cli/benchmark.py)."""

from pipo_mlx.cli.benchmark import main

if __name__ == "__main__":
    main()

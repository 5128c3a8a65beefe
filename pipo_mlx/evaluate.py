"""`python -m pipo_mlx.evaluate`: lm-evaluation-harness tasks on a PIPO model (see pipo_mlx/cli/evaluate.py)."""

from pipo_mlx.cli.evaluate import main

if __name__ == "__main__":
    main()

"""`python -m pipo_mlx.pass_at_k`: pass@k of a PIPO model and its base (see pipo_mlx/cli/pass_at_k.py)."""

from pipo_mlx.cli.pass_at_k import main

if __name__ == "__main__":
    main()

"""`python -m pipo_mlx.calibrate`: choose a PIPO model's confidence threshold on your own prompts (see pipo_mlx/cli/calibrate.py)."""

from pipo_mlx.cli.calibrate import main

if __name__ == "__main__":
    main()

"""`python -m pipo_mlx.fuse`: fold a training checkpoint into a model folder (see pipo_mlx/cli/fuse.py)."""

from pipo_mlx.cli.fuse import main

if __name__ == "__main__":
    main()

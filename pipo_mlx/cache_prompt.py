"""`python -m pipo_mlx.cache_prompt`: save a prompt's caches to a file (see pipo_mlx/cli/cache_prompt.py)."""

from pipo_mlx.cli.cache_prompt import main

if __name__ == "__main__":
    main()

"""`python -m pipo_mlx.server`: an OpenAI-compatible HTTP server (see pipo_mlx/cli/server.py)."""

from pipo_mlx.cli.server import main

if __name__ == "__main__":
    main()

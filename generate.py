"""Generate text with a PIPO model: one backbone step yields one or two tokens.

A thin wrapper; the code and `--help` are in pipo_mlx/cli/generate.py.
"""

from pipo_mlx.cli.generate import main

if __name__ == "__main__":
    main()

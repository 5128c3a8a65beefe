"""The command-line applications: argument parsing, model resolution, printing.

Each module has a `main()` (the console scripts `pipo_mlx.generate`,
`pipo_mlx.convert`, `pipo_mlx.train`); the library never imports this package.
"""

import sys
from typing import Callable

from ..errors import PipoError


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI body: user errors exit 2 with one line on stderr, Ctrl-C exits 130."""
    try:
        main()
    except PipoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

"""User-facing errors and the small wrapper every CLI runs its work through."""

import sys
from typing import Callable


class PipoError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI entry point: user errors exit 2 with one line on stderr."""
    try:
        main()
    except PipoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

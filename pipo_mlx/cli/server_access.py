"""Who may use the server and under which names, what it logs per request, and how it stops.

The flags `--served-model-name`, `--allowed-origins` and `--api-key`, the
one-line request log, and the SIGTERM handler, kept apart from the request
handling in cli/server.py.
"""

import argparse
import hmac
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Callable, FrozenSet, List, Optional, Sequence, Tuple

from ..engine import Finished

ANY_NAME = "*"


def add_access_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("access")
    g.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="names clients may ask for this model by, the first one reported by /v1/models "
                   "(default: the --model path and its folder name); '*' accepts any name, for clients "
                   "that send a fixed one. An unknown name is a 404 otherwise")
    g.add_argument("--allowed-origins", type=lambda s: [o for o in s.split(",") if o], default=[],
                   help="comma-separated web origins whose pages may call the server (CORS), '*' for any "
                   "(default: none)")
    g.add_argument("--api-key", default=os.environ.get("PIPO_MLX_API_KEY"),
                   help="require this key, as 'Authorization: Bearer KEY' or 'x-api-key: KEY' (default: "
                   "$PIPO_MLX_API_KEY, else no key); /health stays open")


def model_names(model_id: str, served: Optional[Sequence[str]]) -> Tuple[str, FrozenSet[str]]:
    """(the name /v1/models reports, the names a request may give; '*' among them accepts any)."""
    names = {model_id, "default_model"}
    if Path(model_id).expanduser().exists():
        path = Path(model_id).expanduser().resolve()
        names |= {str(path), path.name}
    if not served:
        return model_id, frozenset(names)
    shown = next((n for n in served if n != ANY_NAME), model_id)
    return shown, frozenset(names | set(served))


def known_name(name: Optional[str], names: FrozenSet[str]) -> bool:
    return name is None or ANY_NAME in names or name in names


def authorized(headers, api_key: Optional[str]) -> bool:
    """Whether a request carries the key (always, when the server has none)."""
    if api_key is None:
        return True
    given = headers.get("x-api-key") or ""
    bearer = headers.get("Authorization") or ""
    if bearer[:7].lower() == "bearer ":
        given = given or bearer[7:].strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


def cors_headers(origin: Optional[str], allowed: List[str]) -> List[Tuple[str, str]]:
    """The CORS headers for a request from `origin` (none when it is not allowed)."""
    if ANY_NAME in allowed:
        allow = [("Access-Control-Allow-Origin", "*")]
    elif origin is not None and origin in allowed:
        allow = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
    else:
        return []
    return allow + [("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                    ("Access-Control-Allow-Headers", "Authorization, Content-Type, x-api-key, "
                     "anthropic-version, anthropic-beta")]


def log_request(method: str, path: str, status: int, seconds: float, finished: Optional[Finished]) -> None:
    """One line per request: what was asked, how it ended, and what it cost."""
    tokens = ""
    if finished is not None:
        tokens = (f" prompt={finished.prompt_tokens} cached={finished.cached_tokens} "
                  f"generated={finished.completion_tokens} keep={finished.token2_kept / max(finished.steps, 1):.2f}")
    logging.info("%s %s %d%s %.3fs", method, path, status, tokens, seconds)


def stop_on_sigterm(shutdown: Callable[[], None]) -> None:
    """SIGTERM runs `shutdown` off the signal handler (serve_forever's thread cannot wait for itself)."""
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=shutdown, daemon=True).start())


class InFlight:
    """Counts the requests being answered, so that a stopping server lets them send their last event."""

    def __init__(self) -> None:
        self._n = 0
        self._cond = threading.Condition()

    def __enter__(self) -> "InFlight":
        with self._cond:
            self._n += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._n -= 1
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """True once no request is being answered; False if `timeout` seconds pass first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout)

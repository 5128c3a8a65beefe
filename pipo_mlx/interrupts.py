"""Ctrl-C for the length of a block, for the two loops a user interrupts:
streaming generation and training."""

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def ctrl_c_noted(on_press: Callable[[], None]) -> Iterator[Callable[[], bool]]:
    """Within the block, Ctrl-C is recorded and then `on_press` runs (it may raise).

    Yields a callable that tells whether Ctrl-C was pressed. The record matters even
    where `on_press` raises: Python only prints a KeyboardInterrupt raised inside a
    finaliser, and the loop must still stop. Signals reach the main thread only, so
    elsewhere the handler is not installed and the record stays empty.
    """
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed.is_set
        return

    def handler(signum, frame):
        pressed.set()
        on_press()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)

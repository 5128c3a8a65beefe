"""The one exception the library raises for a caller's mistake."""


class PipoError(ValueError):
    """Bad input from the user or caller: a CLI prints it as one line, never a traceback.

    A `ValueError`, so library callers can catch it the usual way.
    """

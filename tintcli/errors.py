"""The one exception type a user ever sees from tint."""


class TintError(Exception):
    """A problem with the user's input or environment.

    The message's first line says what was wrong; the following lines (if any) say how to
    fix it. The CLI prints it without a traceback and exits with status 2.
    """

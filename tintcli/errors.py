"""The exceptions a user ever sees from tint."""


class TintError(Exception):
    """A problem with the user's input or environment.

    The message's first line says what was wrong; the following lines (if any) say how to
    fix it. The CLI prints it without a traceback and exits with ``exit_code``.
    """

    exit_code = 2


class Interrupted(TintError):
    """Ctrl-C: the run stopped, and its message says where the finished rows are."""

    exit_code = 130  # 128 + SIGINT, as shells report it

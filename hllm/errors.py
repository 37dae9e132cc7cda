"""The one exception type a user can cause; the CLI prints it as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing file, a malformed row, an unknown config key, ...

    Args:
        message: what is wrong, in words a user can act on.
        where: the file, row, column or key it happened at (printed first).
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)

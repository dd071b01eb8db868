"""``UserError``: a mistake a user can fix, shown by the command line as one sentence.

>>> str(UserError("the data file x.txt is empty: give it at least one line of text"))
'the data file x.txt is empty: give it at least one line of text'
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; the message names the cause and the fix.

    The command line prints it without a traceback (unless ``--debug``) and
    exits with :attr:`exit_code`.

    >>> UserError("no server at 127.0.0.1:1").exit_code
    1
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

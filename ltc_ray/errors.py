"""Errors a user can cause: bad arguments, bad files, bad config.

Every such error is an :class:`InputError` whose message names the file (or
flag) and the problem, so jobs can print one line and exit with code 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """A problem with the user's input; jobs map it to exit code 2."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the two-argument form picklable across Ray workers
        return (type(self), (self.where, self.problem))

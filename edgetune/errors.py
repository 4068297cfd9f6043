"""Errors edgetune raises on bad input: one readable message naming the file and the problem."""
from __future__ import annotations


class EdgetuneError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, without a traceback."""


class FormatError(EdgetuneError):
    """A model or data file is malformed, truncated or unsupported."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedError(FormatError):
    """A well-formed file uses an architecture or quant type edgetune does not implement."""

"""Errors users see: each names the file, the line and the field."""

from __future__ import annotations


class ConfigError(Exception):
    """A config or catalog file that cannot be used.

    ``problems`` holds one ``file:line: field: reason`` string per problem, so ``meshdns check``
    can print them all and a running server can log why it kept its last good catalog.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

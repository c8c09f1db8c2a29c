"""Errors a user can cause. The CLI prints them in a line or two and exits with code 2."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem with the user's input: config, data, model files or command line."""


class ConfigError(FinetuneError):
    """One or more problems in a config file, each reported as `CONFIG: key: message`."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {key}: {message}" for key, message in problems))

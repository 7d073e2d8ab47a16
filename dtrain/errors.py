"""Errors that are the user's to fix: reported as one line, never as a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data, environment) with a message that says how to fix it."""


class ConfigError(UserError):
    """A config value that is unknown, of the wrong type, or impossible."""

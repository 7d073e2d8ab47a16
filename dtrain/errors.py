"""Errors that are the user's to fix: reported as one line, never as a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data, environment) with a message that says how to fix it.

    Most are the same on every rank (the config and the data are), so only rank 0 reports them.
    """


class RankLocalError(UserError):
    """A mistake that may show on some ranks only (e.g. this rank has no GPU): every rank reports it."""


class ConfigError(UserError):
    """A config value that is unknown, of the wrong type, or impossible."""


class PeerFailure(RankLocalError):
    """A collective failed on this rank: it timed out or lost a peer (another rank died or hangs)."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name where it has none): for one-line errors that
    quote a library's own words."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

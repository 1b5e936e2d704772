"""User-facing errors: raised for bad input and reported by the CLI as one line with a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing checkpoint, bad argument). Its message is one line."""


def os_error_text(err: OSError) -> str:
    """An OSError as a short phrase for a one-line message: 'No space left on device', with the file if known."""
    text = err.strerror or str(err) or type(err).__name__
    return f"{text} ({err.filename})" if err.filename else text
class ConfigError(UserError, ValueError):
    """A config value outside its allowed range. Also a ValueError, so code that validates a config by catching
    ValueError (e.g. model construction) keeps working."""

"""User-facing errors: caught at the CLI edge, printed as one line, exit code 2."""


class UserError(ValueError):
    """A mistake in the user's input (arguments, config, data); the message names the culprit."""

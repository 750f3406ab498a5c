"""User-facing errors: one clear line naming the bad input and the fix."""


class LeanLMError(Exception):
    """A problem with the user's input. The CLI prints it as one line and exits with status 2."""

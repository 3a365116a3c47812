"""User-facing errors: bad input that the user can fix.

Entry points print ``InputError`` messages without a traceback and exit with
status 2. Every message says what is wrong, where (file, field) and how to fix it.
"""


class InputError(ValueError):
    """Bad user input (file, config field, data) with a message that says the fix."""

"""The one base class of r4b's input errors: a bad config, data file or checkpoint.

The CLI prints these as one line naming the file, line and field, without a traceback.
"""


class InputError(ValueError):
    """Bad user input; the message says where (file, line, field) and what was expected."""

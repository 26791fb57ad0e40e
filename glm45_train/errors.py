"""The one base class for errors caused by user input (files, configs, recipes, arguments).

The CLI prints these as one clear line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the culprit (file, tensor, line, key)."""

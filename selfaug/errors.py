"""The one base of selfaug's own exceptions (docs/design.md, "Command line"): every error that means the
user has something to fix (a recipe, the data, a store, a model, a checkpoint) is a `SelfAugError`, so
a library user catches one type and the command line prints it as one line.
"""


class SelfAugError(Exception):
    """Something the user can fix; the message says what and how."""


class ModelError(SelfAugError, ValueError):
    """A model that cannot be built as configured: the message names the key and the fix."""

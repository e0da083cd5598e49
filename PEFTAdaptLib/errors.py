"""User-facing errors: one clear, actionable sentence naming the file, node or setting at fault."""


class PEFTAdaptError(Exception):
    """An input or environment problem the user can fix; the CLI prints it as one line without a traceback."""


class InputError(PEFTAdaptError):
    """A bad image, label or job file."""


class ModelError(PEFTAdaptError):
    """A missing, corrupt, unsafe or mismatched model or adapter file."""

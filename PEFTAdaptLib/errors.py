"""User-facing errors: one clear, actionable sentence naming the file, node or setting at fault."""


class PEFTAdaptError(Exception):
    """An input or environment problem the user can fix; the CLI prints it as one line without a traceback."""

    #: what the user must add for the job to run, when it is more of something (a `failed` event's `needs`), so a
    #: front-end can ask for it without reading the message
    needs = ""


class InputError(PEFTAdaptError):
    """A bad image, label or job file."""


class NeedsAnnotation(InputError):
    """Valid annotations that are too few for the job: none holds the structure, or none is left over to audit on.
    The user annotates more slices (or gives an audit volume) and tries again, as a correction round does."""

    needs = "annotation"


class ModelError(PEFTAdaptError):
    """A missing, corrupt, unsafe or mismatched model or adapter file."""

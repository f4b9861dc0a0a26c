"""One error hierarchy. Library code raises these; the CLI turns them into one line and an exit code."""


class ExportError(Exception):
    """Base class of every error gemma-export reports to a user."""

    exit_code = 1


class CheckpointError(ExportError):
    """A checkpoint is missing, truncated, unsafe or does not match its config."""


class ConfigError(ExportError):
    """A model configuration or option is invalid."""


class UnsupportedError(ExportError):
    """A (format, recipe) pair or an option the chosen format cannot do."""


class BackendMissingError(ExportError):
    """A runtime or exporter package is not installed."""


class ArtifactError(ExportError):
    """An exported artifact is missing, corrupted or inconsistent with its manifest."""


class ResourceError(ExportError):
    """The machine has less memory or disk than a job needs."""


class ParityError(ExportError):
    """An artifact disagrees with its reference beyond the thresholds."""

    exit_code = 3

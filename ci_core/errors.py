"""Domain errors.  The library raises these; only the CLI turns them into exit codes."""


class CIError(Exception):
    """Base class of every error this toolkit raises on bad input."""


class ConfigError(CIError):
    """A configuration value or key is not what was expected."""


class BundleError(CIError):
    """A model bundle is missing, malformed or does not match its backbone."""


class DataError(CIError):
    """A dataset, image folder or class list cannot be used as asked."""


class PluginError(CIError):
    """A plugin is unknown, clashes with another, or failed to register."""


class NotApplicable(CIError):
    """A benchmark cell that has nothing to do, for a reason only its upstream results show (a repair of a model
    its scan could not measure has no trigger to repair with): recorded as declined, not as a failure."""

"""Exceptions of the project, in one place.

Every problem a user can fix (a bad file, a bad flag) is an :class:`InputError`: the command
line turns it into one line on stderr and exit code 2, so scripts can tell "your input is wrong"
apart from "the job crashed".
"""


class InfluenceError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(InfluenceError):
    """The user's input (model, data source, flag) cannot be used; the message says why."""


class ModelError(InputError):
    """The model file cannot be loaded or has no linear head we can split off."""


class SourceError(InputError):
    """A data source is missing, malformed, or does not fit the model."""


class ConfigError(InputError):
    """A configuration value is out of range or inconsistent with the inputs."""


class ClusterError(InfluenceError):
    """The cluster can no longer finish the job (every worker lost, or one shard took down
    its worker again and again); finished work stays in the work area for a resume."""

"""The errors a user can fix. Each message is one line that starts with the field it is about.

Field paths are written as in a study file: its top-level keys bare (``evaluation.limit``,
``sampler``, ``objectives[1]``), a space under ``space.``, a plan under ``plan.`` and a rank
config under ``config.``, whether the object came from a file, from inline YAML or from code.

The command line prints a :class:`DseError` as ``dse: error: <message>`` and exits with status 2;
any other exception is a bug and keeps its traceback. Each kind also derives from the built-in
exception a Python caller would expect (``ValueError``, ``FileNotFoundError`` ...).
"""

from __future__ import annotations


class DseError(Exception):
    """Base of every error a user can fix by changing an input."""


class ConfigError(DseError, ValueError):
    """A bad study field or option (study file, evaluation, calibration, sampler ...)."""


class SpaceError(ConfigError):
    """A bad search space (``space.ranks[2]: ...``)."""


class PlanError(DseError, ValueError):
    """A plan that does not fit its model, or a malformed plan file."""


class ModelError(DseError, ValueError):
    """A model ``dse`` cannot work on as given (no known layout, no projections, no loss)."""


class ModelNotFoundError(DseError, FileNotFoundError):
    """A model name that is neither built in, a local folder, a GGUF file nor reachable on the hub."""


class TaskNotFoundError(ConfigError):
    """An evaluation task that lm-eval does not know or whose data cannot be reached."""


class StorageError(DseError, RuntimeError):
    """A study storage that cannot be opened, or a study that is not in it."""


class StudyError(DseError, RuntimeError):
    """A study that cannot go on as asked (another model's study, workers that failed)."""


class ResultsError(DseError, ValueError):
    """A study that cannot answer the question asked (no trials, no metadata, bad reference)."""


class ExportError(DseError, ValueError):
    """A rank config or compressed model that cannot be written, read or used."""


class OutputExistsError(DseError, FileExistsError):
    """An output path that exists and would be overwritten."""


class HealError(DseError, RuntimeError):
    """A heal that cannot go on (its loss turned NaN or infinite); the model is left as it was."""

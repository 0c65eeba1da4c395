"""The exceptions autofit raises for problems a user can act on.

Every message is one line that says what went wrong and what to do next; the CLI prints it as is.
"""


class AutofitError(Exception):
    """Root of autofit's errors: a problem with the user's input or machine, never a bug."""


class GpuError(AutofitError):
    """An unknown or malformed GPU spec, or a device that is not there."""


class ModelError(AutofitError):
    """A model reference that cannot be resolved offline, or a bad LoRA target."""


class ConfigError(AutofitError):
    """A knob outside what the model or card allows (a sequence beyond the model's positions, say)."""


class DoesNotFitError(AutofitError):
    """Nothing fits: even the smallest configuration needs more memory than the budget.

    ``binding`` says what binds (for each method asked) and ``ways_out`` lists what would fit, both also in the
    message; either may be empty where the message alone says it.
    """

    def __init__(self, message: str, *, binding: str = "", ways_out: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.binding = binding
        self.ways_out = tuple(ways_out)


class SimulationError(AutofitError):
    """A training step could not be simulated on fake tensors (the estimate falls back to the analytic model)."""


class DataError(AutofitError):
    """A dataset file that cannot be read or tokenized."""


class ProbeError(AutofitError):
    """A probe that cannot run: no CUDA device, or memory that does not return to its baseline."""


class CacheError(AutofitError):
    """The cache cannot be used (a read-only or mistyped path, a database another process holds locked): autofit runs
    without it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` runs and nothing is left half-written (exit status 143)."""

"""Every error the compiler raises, under one root: :class:`CompilerError`.

Each message says what was wrong and what to do about it. The CLI prints the message and exits
with status 2; nothing else in the compiler calls ``sys.exit``.
"""

from __future__ import annotations


class CompilerError(Exception):
    """Root of every error raised by ``tierserve_compiler``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(CompilerError):
    """The options contradict each other or name something that does not exist."""


class MissingExtraError(CompilerError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this step needs the Python package {module!r}, which is not installed; "
            f'install it with: pip install -e ".[{extra}]"'
        )
        self.module = module
        self.extra = extra


class SourceError(CompilerError):
    """The model source cannot be loaded or is of an unsupported kind."""


class InputDataError(CompilerError):
    """A validation, calibration or example-inputs file does not match the model's inputs."""


class ExportError(CompilerError):
    """Converting the source model to ONNX failed."""


class AccuracyGateError(ExportError):
    """The exported ONNX graph runs but does not reproduce the source model's outputs."""


class VariantError(CompilerError):
    """Building a variant (fp32, int8_dynamic, int8_static, fp16) failed or is impossible."""


class ArtifactExistsError(CompilerError):
    """NAME/VERSION already exists with different content; artifacts are immutable."""


class PlacementError(CompilerError):
    """No target can serve the model within the limits and the SLO."""


def require(module: str, extra: str):  # type: ignore[no-untyped-def]
    """Import an optional heavy module lazily, or raise a :class:`MissingExtraError`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra) from exc

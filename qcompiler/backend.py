"""The backend contract: how an annotated model becomes the runnable part of an artifact, and how that runs.

A backend is a small class registered by name, like a pass: typed ``Options`` (a
dataclass; a bad value raises ``ValueError`` in ``__post_init__``), `Backend.lower`,
which turns the quantize pass's simulate form into what the backend runs and says per
layer what runs it (`Lowering`), and `Backend.session`, which opens a written artifact
behind onnxruntime's session interface (``run``, ``get_inputs``, ``get_outputs``) for
``qcompile run`` and ``qcompile bench``. The compiler and the CLI know backends only
through this module: a new backend is one package under ``backends/`` that registers
itself here, and no ``if backend == ...`` anywhere.
"""

from __future__ import annotations

import abc
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.calibration.data import CalibrationData
from qcompiler.errors import QCompilerError


@dataclass
class NoOptions:
    """Options of a backend that takes none."""


@dataclass
class Lowering:
    """What each quantized linear became."""

    kernels: dict[str, str] = field(default_factory=dict)  # layer -> the kernel that runs it
    simulated: dict[str, str] = field(default_factory=dict)  # layer -> why it has no native kernel
    rotations: int = 0  # online Hadamard nodes given a kernel of their own

    def runs_as(self, layer: str) -> dict[str, str]:
        """The manifest's entry for ``layer``: its kernel, or why it is simulated."""
        if layer in self.kernels:
            return {"kernel": self.kernels[layer]}
        return {"simulated": self.simulated.get(layer, "no kernel")}


@dataclass
class Lowered:
    """What a backend hands to the artifact writer."""

    model: ir.Model  # written as model.onnx: what `qcompile eval` and fidelity read
    lowering: Lowering
    # Further files of the artifact by name, each with the function that writes it to a path.
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)  # the backend's own manifest entries
    notes: list[str] = field(default_factory=list)


@dataclass
class LowerContext:
    """What a lowering may use: held-out batches (for checks on real inputs) and the log."""

    holdout: CalibrationData | None = None
    log: Callable[[str], None] = lambda message: None


class Session(Protocol):
    """onnxruntime's session interface, which every backend's runner offers."""

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def get_inputs(self) -> list[Any]: ...

    def get_outputs(self) -> list[Any]: ...


class Backend(abc.ABC):
    """Base class of every backend. Subclasses set the class attributes, `lower` and `session`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any | None = None, **kwargs: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            known = ", ".join(sorted(fields)) or "none"
            raise QCompilerError(f"Backend '{self.name}' has no option '{unknown[0]}'; its options are: {known}.")
        try:
            self.options = dataclasses.replace(options, **kwargs) if options is not None else self.Options(**kwargs)
        except (TypeError, ValueError) as exc:
            raise QCompilerError(f"Bad options for backend '{self.name}': {exc}.") from None
        for name, hint in typing.get_type_hints(self.Options).items():
            choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
            if choices and getattr(self.options, name) not in choices:
                raise QCompilerError(f"Option '{name}' of backend '{self.name}' must be one of "
                                     f"{', '.join(map(str, choices))}, not '{getattr(self.options, name)}'.")

    def accepts(self, model: ir.Model) -> None:
        """Refuse in one sentence, before any pass runs, a model this backend can never lower (default: any goes)."""

    @abc.abstractmethod
    def lower(self, model: ir.Model, ctx: LowerContext) -> Lowered:
        """Lower the quantize pass's simulate form of ``model`` (in place, or a copy) into what this backend runs."""

    def session(self, folder: Path, manifest: dict, model: ir.Model, *, threads: int = 0,
                timed: bool = False) -> Session:
        """What runs the artifact in ``folder``; by default an onnxruntime session of its model.onnx, as deployed.

        ``timed`` sessions take turns with others, so their thread pools must not spin between runs.
        """
        from qcompiler.runtime import make_session

        return make_session(model, threads=threads, spinning=not timed, fuse_qdq=True)

    def bench_shape(self, manifest: dict) -> tuple[int, int] | None:
        """``(batch, sequence)`` the artifact must be timed at (a static-shape library), or None for any."""
        return None


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator adding a backend to the registry under its ``name``."""
    if cls.name in BACKENDS:
        raise ValueError(f"backend name '{cls.name}' is registered twice")
    BACKENDS[cls.name] = cls
    return cls


def ensure_loaded() -> None:
    """Import the backend packages so that their `@register_backend` decorators have run."""
    import qcompiler.backends  # noqa: F401


def backend_names() -> list[str]:
    ensure_loaded()
    return list(BACKENDS)


def make_backend(backend: str | Backend, **options: Any) -> Backend:
    """The backend called ``backend`` with ``options`` (or ``backend`` itself when it already is one)."""
    if isinstance(backend, Backend):
        if options:
            raise QCompilerError("Give backend options to the backend object, not beside it.")
        return backend
    ensure_loaded()
    if backend not in BACKENDS:
        raise QCompilerError(f"Unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}.")
    return BACKENDS[backend](**options)


def parse_shapes(text: str) -> list[tuple[int, int]] | str:
    """``"1x128,8x128"`` as (batch, sequence) pairs, or ``"any"`` as itself; anything else is one sentence."""
    if text.strip().lower() == "any":
        return "any"
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise QCompilerError(f"'{item}' is not BATCHxSEQUENCE with positive integers (e.g. 1x128), nor 'any'.")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def option_choices(backend: str, option: str) -> tuple[str, ...]:
    """The values a ``Literal`` option of a registered backend may take (for the CLI's choices)."""
    ensure_loaded()
    hint = typing.get_type_hints(BACKENDS[backend].Options)[option]
    return tuple(typing.get_args(hint))

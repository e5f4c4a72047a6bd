"""Typed errors; each maps to a documented CLI exit code.

0 success, 1 internal error (a bug: please report it), 2 unsupported model or bad input,
3 hardware limit exceeded, 4 verification mismatch (Lava differs from the emulator).
Messages are one line per problem and name the layer and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass


class FtbcError(Exception):
    """Base of every error the CLI reports as a one-line message."""
    exit_code = 1

    def add_context(self, context: str) -> None:
        """Append ``context`` to the message's first line, in place (before a re-raise): what
        the caller knows of the cause, kept to one line per problem."""
        first, newline, rest = str(self).partition("\n")
        self.args = (f"{first}; {context}{newline}{rest}",)


class InputError(FtbcError):
    """Bad input: missing or corrupt file, wrong shapes, bad option values."""
    exit_code = 2


class UnsupportedModelError(InputError):
    """The model contains operations that cannot become integrate-and-fire neurons.

    ``problems`` lists every one found (collected in one pass, reported together)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"unsupported model: {len(self.problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class Violation:
    """One hardware-limit violation: which layer, which quantity, its value and the limit."""
    layer: str
    quantity: str
    value: float
    limit: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"layer {self.layer}: {self.quantity} = {self.value} exceeds {self.limit}"
        return f"{text} ({self.hint})" if self.hint else text


class HardwareLimitError(FtbcError):
    """The quantized network does not fit the target; ``violations`` lists every one."""
    exit_code = 3

    def __init__(self, target: str, violations: list[Violation]):
        self.violations = list(violations)
        lines = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(f"network does not fit target {target!r}: "
                         f"{len(self.violations)} violation(s)\n{lines}")


class VerificationError(FtbcError):
    """Lava's simulation differs from the bit-exact emulator."""
    exit_code = 4


class LavaRuntimeError(FtbcError):
    """Lava's simulation could not complete: a verification worker or one of Lava's runtime
    processes died, failed or stopped making progress (the message names it)."""
    exit_code = 6

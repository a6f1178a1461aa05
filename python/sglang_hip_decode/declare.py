"""What a patch declares: :class:`Patch` (a name, a gate, a default and its :class:`Edit` s), each edit
naming a target method ``package.module:Class.method`` and the :class:`Hunk` s to apply to its source.

A leaf module: the patch files import it and nothing else of this package, so declaring a patch never
imports the engine (``patching``), which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import textwrap

__all__ = ["Hunk", "Edit", "Patch"]


def _normalise(text: str) -> list[str]:
    lines = textwrap.dedent(text).split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.rstrip() for line in lines]


def _split_target(target: str) -> tuple[str, list[str]]:
    module, sep, path = target.partition(":")
    parts = path.split(".") if path else []
    if not sep or not module or len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"target {target!r} is not of the form 'package.module:Class.method'")
    return module, parts


@dataclasses.dataclass(frozen=True)
class Hunk:
    """Replace the lines ``before`` (which must occur exactly once) with ``after``.

    Both are written dedented; leading and trailing blank lines are ignored. The match may sit at
    any indentation inside the method, and ``after`` is re-indented by the same amount.
    """

    before: str
    after: str

    def before_lines(self) -> list[str]:
        return _normalise(self.before)

    def after_lines(self) -> list[str]:
        return _normalise(self.after)


@dataclasses.dataclass(frozen=True)
class Edit:
    """The hunks applied to one target method, ``"package.module:Class.method"``."""

    target: str
    hunks: tuple[Hunk, ...]

    def __post_init__(self) -> None:
        _split_target(self.target)  # validates the form early, at import of the patch file
        if not self.hunks:
            raise ValueError(f"edit of {self.target} has no hunks")


@dataclasses.dataclass(frozen=True)
class Patch:
    """One switchable decode-path edit, declared as data.

    ``gate`` is ``"hip"`` (applied only on ROCm unless forced) or ``"any"``. ``default`` says
    whether the patch is in the default set. ``upstream`` names the upstream change and release
    that later carries an equivalent; ``summary`` is one line for ``status``.
    """

    name: str
    summary: str
    edits: tuple[Edit, ...]
    gate: str = "hip"
    default: bool = True
    upstream: str = ""

    def __post_init__(self) -> None:
        if self.gate not in ("hip", "any"):
            raise ValueError(f"patch {self.name}: gate must be 'hip' or 'any', not {self.gate!r}")
        if not self.edits:
            raise ValueError(f"patch {self.name} has no edits")
        targets = [e.target for e in self.edits]
        if len(set(targets)) != len(targets):
            raise ValueError(f"patch {self.name}: a target appears twice; merge its hunks")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(e.target for e in self.edits)

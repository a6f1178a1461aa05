"""What a patch declares: :class:`Patch` (a name, a gate, a default and, per range of sglang releases,
:class:`Releases`: the :class:`Edit` s for that range's text, or :class:`Upstream` (upstream has an
equivalent there), or a reason it does not apply). Each edit names a target method
``package.module:Class.method`` and the :class:`Hunk` s to apply to its source.

A leaf module: the patch files import it and nothing else of this package, so declaring a patch never
imports the engine (``patching``), which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap

__all__ = ["Hunk", "Edit", "Upstream", "Releases", "Patch", "parse_release", "format_release"]

_RELEASE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)"
                      r"(?:[.-]?post(\d+))?"  # 0.5.12.post1, 0.5.12-post1, 0.5.12post1
                      r"(?:[.-]?(?:dev|rc|c|a|b|alpha|beta|pre|preview)\d*)?")  # 0.5.13rc1, 0.5.12.post2.dev3


def parse_release(text: str | None) -> tuple[int, int, int, int] | None:
    """An sglang release as a comparable tuple ``(major, minor, micro, k)``, PEP 440's order for the
    forms sglang's versions take: ``k`` is 0 for the release, ``2 (N + 1)`` for ``.postN``, one less
    for a pre-release or dev build of either (``0.5.13rc1`` < ``0.5.13``, ``0.5.12.post2.dev3``
    between ``.post1`` and ``.post2``). A local tag (``+rocm700``) is the same release. ``None`` for
    anything else."""
    if not isinstance(text, str):
        return None
    match = _RELEASE.fullmatch(text.split("+", 1)[0].strip().lower())
    if match is None:
        return None
    major, minor, micro, post = match.groups()
    pre = match.end(4 if post is not None else 3) < match.end()  # a pre/dev marker after it
    k = (2 * (int(post) + 1) if post is not None else 0) - (1 if pre else 0)
    return int(major), int(minor), int(micro), k


def format_release(release: tuple[int, int, int, int]) -> str:
    """``(0, 5, 12, 4)`` -> ``"0.5.12.post1"``; a pre-release or dev build says so."""
    base, k = ".".join(map(str, release[:3])), release[3]
    if k == -1:
        return base + " (pre-release or dev build)"
    if k <= 0:
        return base
    post = f".post{(k + 1) // 2 - 1}"
    return base + post + (" (dev build)" if k % 2 else "")


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
class Upstream:
    """Upstream carries an equivalent of the patch in a range of releases. ``evidence``: pairs of
    (where, text) that every release of the range contains and none before it, checked against the
    release wheels by the status test; ``where`` is a file inside the sglang tree
    (``sglang/srt/x.py``) or a method (``sglang.srt.x:Class.method``: the text within its source)."""

    since: str  # the first release that has it
    change: str  # e.g. "sglang#24125"
    evidence: tuple[tuple[str, str], ...] = ()


def _check_edits(owner: str, edits: tuple[Edit, ...]) -> None:
    targets = [e.target for e in edits]
    if len(set(targets)) != len(targets):
        raise ValueError(f"{owner}: a target appears twice; merge its hunks")


@dataclasses.dataclass(frozen=True)
class Releases:
    """What a patch does on the releases ``first`` ... ``last`` (inclusive; ``last=None``: and every
    later one, which is tried with these edits): exactly one of ``edits``, ``upstream`` or
    ``not_applicable`` (the reason)."""

    first: str
    last: str | None = None
    edits: tuple[Edit, ...] = ()
    upstream: Upstream | None = None
    not_applicable: str = ""

    def __post_init__(self) -> None:
        if sum((bool(self.edits), self.upstream is not None, bool(self.not_applicable))) != 1:
            raise ValueError(f"releases {self.first}..{self.last}: give exactly one of edits, upstream, not_applicable")
        if parse_release(self.first) is None or (self.last is not None and parse_release(self.last) is None):
            raise ValueError(f"releases {self.first}..{self.last}: not release strings")
        if self.last is not None and parse_release(self.last) < parse_release(self.first):
            raise ValueError(f"releases {self.first}..{self.last}: the range is empty")
        _check_edits(f"releases {self.first}..{self.last}", self.edits)

    def why_no_edits(self) -> str:
        """For a range without edits: ``upstream has it (<change>)``, or the reason it does not apply."""
        return f"upstream has it ({self.upstream.change})" if self.upstream is not None else self.not_applicable

    def contains(self, release: tuple[int, int, int, int]) -> bool:
        return parse_release(self.first) <= release and (self.last is None or release <= parse_release(self.last))

    def describe(self) -> str:
        if self.last is None:
            return f"{self.first}+"
        return self.first if self.first == self.last else f"{self.first}..{self.last}"


@dataclasses.dataclass(frozen=True)
class Patch:
    """One switchable decode-path edit, declared as data.

    ``gate`` is ``"hip"`` (applied only on ROCm unless forced) or ``"any"``. ``default`` says
    whether the patch is in the default set. ``releases`` says per range of sglang releases what
    the patch does there (:class:`Releases`, in order, not overlapping); the short form ``edits=``
    (no ``releases``) applies the same edits on every release. ``upstream`` names the upstream
    change that carries an equivalent; ``summary`` is one line for ``status``.
    """

    name: str
    summary: str
    edits: tuple[Edit, ...] = ()
    gate: str = "hip"
    default: bool = True
    upstream: str = ""
    releases: tuple[Releases, ...] = ()

    def __post_init__(self) -> None:
        if self.gate not in ("hip", "any"):
            raise ValueError(f"patch {self.name}: gate must be 'hip' or 'any', not {self.gate!r}")
        if bool(self.edits) == bool(self.releases):
            raise ValueError(f"patch {self.name}: give its edits, or its releases (not both, not neither)")
        _check_edits(f"patch {self.name}", self.edits)
        ranges = [(parse_release(r.first), parse_release(r.last) if r.last else None) for r in self.releases]
        for (_, last), (first, _) in zip(ranges, ranges[1:]):
            if last is None or first <= last:
                raise ValueError(f"patch {self.name}: release ranges must be in order and not overlap")

    def for_release(self, release: tuple[int, int, int, int] | None) -> Releases | None:
        """The declaration that covers ``release`` (the short form covers every release)."""
        if not self.releases:
            return Releases("0.0.0", None, edits=self.edits)
        if release is None:
            return None
        return next((r for r in self.releases if r.contains(release)), None)

    def neighbours(self, release: tuple[int, int, int, int]) -> tuple[Releases | None, Releases | None]:
        """For a release no range covers: the range just before it and the one just after it
        (None where there is none)."""
        before = [r for r in self.releases if r.last is not None and parse_release(r.last) < release]
        after = [r for r in self.releases if release < parse_release(r.first)]
        return (before[-1] if before else None), (after[0] if after else None)

    def candidates(self, release: tuple[int, int, int, int] | None) -> tuple[Releases, ...]:
        """The declarations whose edits to try on ``release``: the one covering it, if it declares
        edits (none if it says upstream or not applicable); for a release between two declared
        ranges (one nobody verified, e.g. a hot-fix), the range before it, then the range after it,
        each that declares edits; the engine takes the first whose anchors all match. A release
        before the first range or after a closed last one gets none."""
        covering = self.for_release(release)
        if covering is not None:
            return (covering,) if covering.edits else ()
        if release is None:
            return ()
        before, after = self.neighbours(release)
        if before is None or after is None:
            return ()
        return tuple(r for r in (before, after) if r.edits)

    def at(self, edits: tuple[Edit, ...]) -> "Patch":
        """This patch with ``edits`` only (what the engine installs for one release)."""
        return dataclasses.replace(self, edits=tuple(edits), releases=())

    @property
    def targets(self) -> tuple[str, ...]:
        """Every target any release's edits name, in order."""
        edits = self.edits or tuple(e for r in self.releases for e in r.edits)
        return tuple(dict.fromkeys(e.target for e in edits))

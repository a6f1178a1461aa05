"""Which patches run here: the pinned sglang version, the platform, and the environment switches.

Everything in this module is cheap and never raises on bad input: a malformed switch becomes a
``problem`` string that ``status`` and the log show, and the safest reading is taken (a
malformed ``SGLANG_HIP_DECODE`` applies nothing).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

TARGET_SGLANG = "0.5.11"

ENV_ENABLE = "SGLANG_HIP_DECODE"
ENV_PATCHES = "SGLANG_HIP_DECODE_PATCHES"
ENV_ANY_PLATFORM = "SGLANG_HIP_DECODE_ANY_PLATFORM"
ENV_STATUS_FILE = "SGLANG_HIP_DECODE_STATUS_FILE"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def sglang_version() -> str | None:
    """The installed sglang's version, read from its metadata (does not import sglang)."""
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def sglang_supported(version: str | None) -> bool:
    """Exactly the pinned release; a local build tag (``0.5.11+rocm700``) is the same release."""
    return version is not None and version.split("+", 1)[0] == TARGET_SGLANG


def platform() -> str:
    """``"hip"``, ``"cuda"`` or ``"cpu"``: the torch build (a HIP build counts as HIP with no GPU)."""
    try:
        import torch
    except Exception:
        return "cpu"
    if getattr(torch.version, "hip", None):
        return "hip"
    if getattr(torch.version, "cuda", None) and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _flag(env: Mapping[str, str], name: str, default: bool) -> tuple[bool | None, str | None]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default, None
    value = raw.strip().lower()
    if value in _TRUE:
        return True, None
    if value in _FALSE:
        return False, None
    return None, f"{name}={raw!r} is not 0 or 1"


@dataclasses.dataclass(frozen=True)
class Switches:
    """The environment switches as read once, with what was wrong with them."""

    enabled: bool
    off_reason: str | None  # why nothing applies ("SGLANG_HIP_DECODE=0", or the malformed value)
    selection: str  # "default", "all", "none" or "list"
    names: tuple[str, ...]  # for "list": the names asked for (known and unknown)
    any_platform: bool
    problems: tuple[str, ...]

    def selects(self, name: str, default: bool) -> bool:
        if self.selection == "all":
            return True
        if self.selection == "none":
            return False
        if self.selection == "list":
            return name in self.names
        return default

    def not_selected_reason(self, default: bool) -> str:
        if self.selection == "none":
            return f"off ({ENV_PATCHES}=none)"
        if self.selection == "list":
            return f"off (not in {ENV_PATCHES})"
        return f"off (opt-in; add it to {ENV_PATCHES})"


def read_switches(env: Mapping[str, str] | None = None, known: Sequence[str] = ()) -> Switches:
    env = os.environ if env is None else env
    problems = []

    enabled, problem = _flag(env, ENV_ENABLE, True)
    off_reason = None
    if problem:
        problems.append(problem + "; applying nothing")
        enabled, off_reason = False, problem
    elif not enabled:
        off_reason = f"{ENV_ENABLE}={env[ENV_ENABLE].strip()}"

    any_platform, problem = _flag(env, ENV_ANY_PLATFORM, False)
    if problem:
        problems.append(problem + "; HIP-gated patches stay HIP-only")
        any_platform = False

    raw = env.get(ENV_PATCHES, "").strip()
    names: tuple[str, ...] = ()
    if raw == "" or raw.lower() == "default":
        selection = "default"
    elif raw.lower() in ("all", "none"):
        selection = raw.lower()
    else:
        selection = "list"
        names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
        unknown = [n for n in names if known and n not in known]
        if unknown:
            problems.append(
                f"{ENV_PATCHES}: unknown patch {', '.join(map(repr, unknown))} (known: {', '.join(known)})"
            )
        if not names:
            problems.append(f"{ENV_PATCHES}={raw!r} names no patch")
    return Switches(bool(enabled), off_reason, selection, names, bool(any_platform), tuple(problems))

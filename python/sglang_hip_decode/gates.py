"""Which patches run here: the installed sglang release, the platform, and the environment switches.

Everything in this module is cheap and never raises on bad input: a malformed switch becomes a
``problem`` string that ``status`` and the log show, and the safest reading is taken (a
malformed ``SGLANG_HIP_DECODE`` applies nothing).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

# The releases the patch set was checked on (each patch's declarations against each wheel's source;
# parity on 0.5.11, 0.5.12.post1, 0.5.13.post1 and 0.5.23). Older ones lack SGLang's plugin loader;
# a newer one is tried with each patch's newest edits ("applied (verified up to ...)").
VERIFIED_RELEASES = ("0.5.11", "0.5.12", "0.5.12.post1", "0.5.13", "0.5.13.post1", "0.5.14", "0.5.15", "0.5.15.post1",
                     "0.5.16", "0.5.17", "0.5.18", "0.5.19", "0.5.20", "0.5.21", "0.5.22", "0.5.23")
OLDEST_RELEASE, NEWEST_VERIFIED = VERIFIED_RELEASES[0], VERIFIED_RELEASES[-1]

ENV_ENABLE = "SGLANG_HIP_DECODE"
ENV_PATCHES = "SGLANG_HIP_DECODE_PATCHES"
ENV_ANY_PLATFORM = "SGLANG_HIP_DECODE_ANY_PLATFORM"
ENV_STATUS_FILE = "SGLANG_HIP_DECODE_STATUS_FILE"

SWITCH_ON = ("1", "true", "yes", "on")
SWITCH_OFF = ("0", "false", "no", "off")


def sglang_version() -> str | None:
    """The installed sglang's version, read from its metadata (does not import sglang)."""
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def version_in_text(text: str | None) -> str | None:
    """The ``__version__`` an sglang ``_version.py`` (its text) assigns, or None."""
    import re

    if not text:
        return None
    match = re.search(r"""^__version__\s*=\s*(?:version\s*=\s*)?["']([^"']+)["']""", text, re.MULTILINE)
    return match.group(1) if match else None


def sglang_importable() -> bool:
    """Whether an ``sglang`` package can be imported here (found, not imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec("sglang") is not None
    except (ImportError, ValueError):
        return False


def sglang_package_version() -> str | None:
    """The version the importable sglang package carries (its generated ``_version.py``, read as text,
    without importing sglang); compared with the metadata, it shows two installations at once.
    None where the package has no such file (a source checkout)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        try:
            with open(os.path.join(folder, "_version.py"), encoding="utf-8") as fh:
                found = version_in_text(fh.read())
        except OSError:
            continue
        if found:
            return found
    return None


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
    if value in SWITCH_ON:
        return True, None
    if value in SWITCH_OFF:
        return False, None
    return None, f"{name}={raw!r} is not a switch value (on: {'/'.join(SWITCH_ON)}; off: {'/'.join(SWITCH_OFF)}; any case)"


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

"""Which release this process imports, as the tests and tools that run a patch's path need to know it."""

from __future__ import annotations


def edits_here(patch) -> tuple[bool, str]:
    """Whether ``patch`` declares edits for the installed sglang release, and if not, why (a skip reason)."""
    from ..declare import format_release
    from ..patching import installed_release

    release = installed_release()
    if patch.candidates(release):
        return True, ""
    declared = patch.for_release(release)
    why = "nothing declared" if declared is None else declared.why_no_edits()
    shown = format_release(release) if release is not None else "(unknown release)"
    return False, f"{patch.name} has no edits on sglang {shown}: {why}"

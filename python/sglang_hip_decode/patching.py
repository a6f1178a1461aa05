"""The patch engine: edit the source of upstream methods in place, as data.

A patch (one file in ``patches/``) is a :class:`Patch`: a name and a list of :class:`Edit`, each
naming a target method ``module:Class.method`` and the :class:`Hunk` s to apply to its source
(exact ``before`` lines -> ``after`` lines). The engine

* edits only a plain function whose code comes from the file of the module that defines the
  owning class: a target already wrapped by someone else (SGLang's ``HookRegistry``, a
  ``functools.wraps`` decorator, ``torch.compile``) is refused and left in place, because its
  source (``inspect`` follows ``__wrapped__``) is not the code that runs there;
* reads the original method's source with ``inspect.getsource``, applies every hunk (each
  ``before`` must match exactly once, in code: a match that lies inside a string literal or a
  comment does not count; the match may sit at any indentation, and ``after`` is indented the
  same way), and compiles the result against the original module's globals;
* compiles inside a stand-in class body whose namespace is a copy of the owner's, so defaults
  and decorators evaluate as they did upstream, private names mangle with the owner's name, and
  zero-argument ``super()`` sees the real owner; annotations are compiled unevaluated (a name
  imported under ``TYPE_CHECKING`` must not break the patch);
* keeps the original's defaults, annotations, qualname and attributes, sets ``__wrapped__`` to the
  original function, and registers the patched text with ``linecache`` under a file name that
  says it is patched, so tracebacks and ``inspect.getsource(func.__code__)`` show the lines that
  really run (kept there through ``linecache.clearcache()``; ``inspect.getsource(func)`` follows
  ``__wrapped__`` to the original, by Python's design);
* installs the result on the owning class itself, all targets of a patch or none of them.

Several patches may edit one method: the installed method is always the original source with the
hunks of every active patch applied in the order they were applied. ``unapply`` rebuilds it without
the patch, and when no patch is left the original object is put back (identity, not a copy).

Why not SGLang's ``HookRegistry``: it wraps callables (it cannot edit a body), has no undo, and
applies later, in ``apply_hooks()``; the parity tests need an exact in-process A/B.
"""

from __future__ import annotations

import __future__
import ast
import contextlib
import dataclasses
import importlib
import inspect
import io
import linecache
import os
import sys
import threading
import tokenize
import types
from typing import Iterable, Iterator, Sequence

from .declare import Edit, Hunk, Patch, Releases, Upstream, _split_target, format_release, parse_release  # noqa: F401 (re-exported)

__all__ = [
    "Hunk",
    "Edit",
    "Patch",
    "PatchError",
    "apply",
    "unapply",
    "applied",
    "is_applied",
    "active_patches",
    "patched_source",
    "edit_file_texts",
    "resolve_target",
]

# Marker set on every function the engine installs: the names of the patches it carries.
PATCHED_MARKER = "__sglang_hip_decode_patches__"


class PatchError(Exception):
    """An edit could not be made; the message is the status text after ``failed: ``."""


# --------------------------------------------------------------------------------------------
# Targets


@dataclasses.dataclass
class _Target:
    """What the engine knows about one method it has patched."""

    name: str
    owner: type
    attr: str
    original_raw: object  # the object in owner.__dict__ before any patch (function/static/class)
    installed_raw: object  # what the engine last put there
    active: list[Patch]  # in application order


_LOCK = threading.RLock()
_TARGETS: dict[str, _Target] = {}
_SUPPORTED_KINDS = (types.FunctionType, staticmethod, classmethod)


def resolve_target(target: str) -> tuple[type, str, object]:
    """Import the module and return ``(owner class, attribute name, raw object in its dict)``."""
    module_name, parts = _split_target(target)
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or the module failing while it imports
        raise PatchError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
    for part in parts[:-1]:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PatchError(f"{target}: {part} not found (upstream changed)") from None
    if not isinstance(obj, type):
        raise PatchError(f"{target}: {parts[-2]} is not a class")
    attr = parts[-1]
    if attr not in obj.__dict__:
        raise PatchError(f"{target}: {attr} is not defined on {obj.__name__} itself (upstream changed)")
    raw = obj.__dict__[attr]
    if not isinstance(raw, _SUPPORTED_KINDS):
        if callable(raw) or hasattr(raw, "__wrapped__"):  # a callable object: lru_cache, partial, ...
            raise PatchError(f"{target} is wrapped by {type(raw).__module__}.{type(raw).__qualname__} (not a plain "
                             "function); not touching it")
        raise PatchError(f"{target}: is a {type(raw).__name__}; only plain, static and class methods can be edited")
    inner = _function_of(raw)
    if not isinstance(inner, types.FunctionType):  # staticmethod(lru_cache(f)), classmethod(partial(f)), ...
        raise PatchError(f"{target} is wrapped by {type(inner).__module__}.{type(inner).__qualname__} inside a "
                         f"{type(raw).__name__} (not a plain function); not touching it")
    return obj, attr, raw


def _function_of(raw: object) -> types.FunctionType:
    return raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw  # type: ignore[union-attr]


def _code_location(func: types.FunctionType) -> str:
    """Who really runs when ``func`` is called: its code's qualified name and where it was defined
    (``__qualname__``/``__module__`` are copied from the wrapped function by ``functools.wraps``)."""
    code = func.__code__
    return f"{getattr(code, 'co_qualname', code.co_name)} ({code.co_filename}:{code.co_firstlineno})"


def _require_plain(target: str, owner: type, raw: object) -> None:
    """Refuse a target that is not the plain function its owner's module file defines.

    A wrapper made with ``functools.wraps`` (SGLang's ``HookRegistry`` hooks, most decorators,
    ``torch.compile``) carries ``__wrapped__``; ``inspect.getsource`` follows it to the original's
    text, so editing "it" would compile the original against the wrapper's globals and install it
    over the wrapper, dropping the hook. A wrapper without ``__wrapped__`` is caught by its code
    coming from another file. Functions this engine installed are known by identity, not here."""
    func = _function_of(raw)
    module = sys.modules.get(owner.__module__)
    try:
        module_file = inspect.getsourcefile(module) if module is not None else None
    except TypeError:
        module_file = None
    if module_file is None:
        raise PatchError(f"{target}: cannot find the source file of {owner.__module__} (the module defining {owner.__name__})")
    wrapped = getattr(func, "__wrapped__", None)
    same_file = os.path.realpath(func.__code__.co_filename) == os.path.realpath(module_file)
    if wrapped is not None or not same_file:
        try:
            inner = f"around {_code_location(inspect.unwrap(func))}; " if wrapped is not None else ""
        except ValueError:  # a __wrapped__ cycle
            inner = "around a __wrapped__ cycle; "
        raise PatchError(f"{target} is wrapped by {_code_location(func)} ({inner}the engine edits only the plain "
                         f"function defined in {module_file}: apply sglang-hip-decode before the wrapper is installed; "
                         "the wrapper is left in place)")
    attr, name = target.rsplit(".", 1)[1], func.__code__.co_name
    if name.startswith("__") and not name.endswith("__"):
        name = f"_{owner.__name__.lstrip('_')}{name}"  # a private method's attribute is mangled
    if name != attr:
        # ``forward = _impl`` or a factory's function: recompiling defines ``_impl``, not ``attr``.
        raise PatchError(f"{target} is the function {func.__code__.co_name} (defined under another name); only a "
                         "method defined under its own name can be edited")
    free = [name for name in func.__code__.co_freevars if name != "__class__"]
    if free:
        # Recompiled at class level, a closure's free variables would become module globals.
        raise PatchError(f"{target} is a closure over {', '.join(free)} (made by a factory); recompiling it would "
                         "lose those cells")


# --------------------------------------------------------------------------------------------
# Source editing


def _find(source: list[str], before: list[str]) -> list[tuple[int, str]]:
    """Every ``(line index, indent)`` at which ``before`` matches ``source`` line for line."""
    matches = []
    first = before[0]
    for i in range(len(source) - len(before) + 1):
        line = source[i].rstrip()
        if not line.endswith(first) or line[: len(line) - len(first)].strip():
            continue
        indent = line[: len(line) - len(first)]
        if all(
            (source[i + k].strip() == "" if not want else source[i + k].rstrip() == indent + want)
            for k, want in enumerate(before)
        ):
            matches.append((i, indent))
    return matches


_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python >= 3.12 splits f-strings into tokens
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def _literal_spans(source: list[str]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``(start, end)`` as 0-based ``(line, column)`` of every string literal and comment."""
    spans, open_fstrings = [], []
    try:
        for tok in tokenize.generate_tokens(io.StringIO("\n".join(source) + "\n").readline):
            start, end = (tok.start[0] - 1, tok.start[1]), (tok.end[0] - 1, tok.end[1])
            if tok.type in (tokenize.STRING, tokenize.COMMENT):
                spans.append((start, end))
            elif tok.type == _FSTRING_START:
                open_fstrings.append(start)
            elif tok.type == _FSTRING_END and open_fstrings:
                spans.append((open_fstrings.pop(), end))
    except (tokenize.TokenError, SyntaxError) as exc:
        raise PatchError(f"cannot tokenize the source being edited: {exc}") from exc
    return spans


def _in_code(source: list[str], before: list[str], match: tuple[int, str], spans) -> bool:
    """Whether a match is code: no string literal or comment reaches into it from outside (a match
    inside a docstring is text, not code; a literal wholly inside the match is part of the code)."""
    i, indent = match
    last = i + len(before) - 1
    lo, hi = (i, len(indent)), (last, len(source[last].rstrip()))
    return all(not (start < hi and end > lo) or (lo <= start and end <= hi) for start, end in spans)


def _apply_hunks(source: list[str], edit: Edit) -> list[str]:
    for number, hunk in enumerate(edit.hunks, start=1):
        before = hunk.before_lines()
        if not before:
            raise PatchError(f"hunk {number} of {edit.target} has an empty 'before'")
        found = _find(source, before)
        matches = found
        if found:
            try:
                spans = _literal_spans(source)
            except PatchError as exc:
                raise PatchError(f"hunk {number} of {edit.target}: {exc}") from None
            matches = [m for m in found if _in_code(source, before, m, spans)]
        if not matches:
            where = " in code (only inside a string literal or comment)" if found else ""
            raise PatchError(f"hunk {number} of {edit.target} did not match{where} (upstream changed)")
        if len(matches) > 1:
            raise PatchError(
                f"hunk {number} of {edit.target} matched {len(matches)} times (anchor not unique)"
            )
        i, indent = matches[0]
        after = [indent + line if line else "" for line in hunk.after_lines()]
        source = source[:i] + after + source[i + len(before) :]
    return source


def _original_source(func: types.FunctionType) -> tuple[list[str], int, str]:
    """The original method's lines (as in the file), first line number and file name."""
    lines, first = inspect.getsourcelines(func)
    return [line.rstrip("\n") for line in lines], first, inspect.getsourcefile(func) or ""


def _edited_lines(func: types.FunctionType, edits: Sequence[Edit]) -> list[str]:
    """The original method's lines (file indentation) with ``edits`` applied in order."""
    source, _, _ = _original_source(func)
    for edit in edits:
        source = _apply_hunks(source, edit)
    return source


def _edits_for(target: str, patches: Iterable[Patch]) -> list[Edit]:
    return [e for p in patches for e in p.edits if e.target == target]


# --------------------------------------------------------------------------------------------
# Compiling


class _OwnerNamespace(type):
    """Metaclass of the stand-in class body: a copy of the owner's namespace, not a new class.

    ``__prepare__`` hands the body a copy of the owner's ``__dict__`` (defaults and decorators see
    the names upstream's class body saw); ``__new__`` returns the namespace itself, so no class is
    created and the ``__class__`` cell stays empty until the engine fills it with the real owner.
    """

    @classmethod
    def __prepare__(mcls, name, bases, owner=None):  # noqa: N804
        return dict(vars(owner))

    def __new__(mcls, name, bases, namespace, owner=None):  # noqa: N804
        return namespace


_COMPILE_FLAGS = __future__.annotations.compiler_flag


def _patched_filename(real_file: str, names: Sequence[str]) -> str:
    return f"{real_file} (patched by sglang-hip-decode: {'+'.join(names)})"


def _compile(
    owner: type,
    attr: str,
    original_raw: object,
    lines: list[str],
    names: Sequence[str],
) -> object:
    """Compile the edited method and return the raw object to put in ``owner.__dict__``."""
    func = _function_of(original_raw)
    orig_lines, first, real_file = _original_source(func)
    filename = _patched_filename(real_file, names)
    # The method keeps its file indentation (re-indenting would change multi-line string literals)
    # under a stand-in ``class`` line at column 0, placed just above it so that line numbers match
    # the file shown in tracebacks: the real file with the method's lines replaced.
    body = "\n".join(lines)
    header = f"class {owner.__name__}(metaclass=__sglang_hip_decode_ns__, owner=__sglang_hip_decode_owner__):"
    code_text = "\n" * max(first - 2, 0) + header + "\n" + body + "\n"
    try:
        code = compile(code_text, filename, "exec", flags=_COMPILE_FLAGS, dont_inherit=True)
    except SyntaxError as exc:
        raise PatchError(f"patched {owner.__name__}.{attr} does not compile: {exc}") from exc
    scratch = {"__sglang_hip_decode_ns__": _OwnerNamespace, "__sglang_hip_decode_owner__": owner}
    try:
        exec(code, func.__globals__, scratch)  # noqa: S102 - the point of the engine
    except Exception as exc:
        raise PatchError(f"patched {owner.__name__}.{attr} failed to define: {type(exc).__name__}: {exc}") from exc
    namespace = scratch[owner.__name__]
    new_raw = namespace[attr]
    if new_raw is original_raw or _function_of(new_raw).__code__.co_filename != filename:
        raise PatchError(f"patched {owner.__name__}.{attr} was not defined by the edited source")
    if type(new_raw) is not type(original_raw):
        raise PatchError(
            f"patched {owner.__name__}.{attr} is a {type(new_raw).__name__}, the original a {type(original_raw).__name__}"
        )
    cell = namespace.get("__classcell__")
    if cell is not None:
        cell.cell_contents = owner
    new_func = _function_of(new_raw)
    _copy_metadata(func, new_func)
    new_func.__wrapped__ = func
    setattr(new_func, PATCHED_MARKER, tuple(names))

    # linecache: the real file with the method's lines replaced by the patched ones, under the
    # patched file name, with mtime None so that ``linecache.checkcache`` keeps it.
    with open(real_file, encoding="utf-8") as fh:
        file_lines = fh.read().splitlines()
    shown = file_lines[: first - 1] + lines + file_lines[first - 1 + len(orig_lines) :]
    _show_in_linecache(filename, [line + "\n" for line in shown])
    return new_raw


# Patched file name -> its linecache entry. linecache.checkcache() keeps entries whose mtime is None,
# but clearcache() (torch's inductor calls it after compiling) empties the cache; the patched text
# has no file to be re-read from, and re-reading "lazily" through the module's loader would show
# the *original* lines at the patched line numbers. So clearcache is wrapped once to put these back.
_SHOWN: dict[str, tuple] = {}
_clearcache = None  # linecache.clearcache as it was when the engine wrapped it, once


def _clearcache_keeping_patched_sources() -> None:
    _clearcache()
    linecache.cache.update(_SHOWN)


def _show_in_linecache(filename: str, text: list[str]) -> None:
    global _clearcache
    entry = (sum(map(len, text)), None, text, filename)
    _SHOWN[filename] = entry
    linecache.cache[filename] = entry
    if _clearcache is None:  # wrap once; whoever wraps it after us calls through to us
        _clearcache, linecache.clearcache = linecache.clearcache, _clearcache_keeping_patched_sources


def _copy_metadata(original: types.FunctionType, new: types.FunctionType) -> None:
    """Keep what callers and introspection see of the original, where the signature is unchanged."""
    same_signature = (
        original.__code__.co_argcount == new.__code__.co_argcount
        and original.__code__.co_kwonlyargcount == new.__code__.co_kwonlyargcount
        and original.__code__.co_varnames[: original.__code__.co_argcount + original.__code__.co_kwonlyargcount]
        == new.__code__.co_varnames[: new.__code__.co_argcount + new.__code__.co_kwonlyargcount]
        and len(original.__defaults__ or ()) == len(new.__defaults__ or ())
    )
    if same_signature:
        new.__defaults__ = original.__defaults__
        new.__kwdefaults__ = original.__kwdefaults__
        new.__annotations__ = dict(original.__annotations__)
    new.__qualname__ = original.__qualname__
    new.__module__ = original.__module__
    for key, value in vars(original).items():
        # Markers a decorator set on the function itself (``_torchscript_modifier``, public tags)
        # are kept; torch.compile's wrapper bookkeeping (``_torchdynamo_*``) would make the new
        # function claim to be a compiled wrapper of something else.
        if key not in ("__wrapped__", PATCHED_MARKER) and not key.startswith("_torchdynamo"):
            setattr(new, key, value)


# --------------------------------------------------------------------------------------------
# Apply / unapply


def _plan(target_names: Iterable[str], active_after: dict[str, list[Patch]]) -> dict[str, tuple[_Target, object]]:
    """Build (without installing) the raw object each target gets under ``active_after``."""
    plan = {}
    for name in target_names:
        state = _TARGETS.get(name)
        if state is None:
            owner, attr, raw = resolve_target(name)
            _require_plain(name, owner, raw)
            state = _Target(name, owner, attr, raw, raw, [])
        else:
            current = state.owner.__dict__.get(state.attr)
            if current is not state.installed_raw:
                by = _code_location(_function_of(current)) if isinstance(current, _SUPPORTED_KINDS) else repr(current)
                raise PatchError(f"{name} is wrapped by {by} (installed after sglang-hip-decode patched it; replaced by "
                                 "someone else since it was patched): not touching it")
        patches = active_after[name]
        if not patches:
            new_raw = state.original_raw
        else:
            func = _function_of(state.original_raw)
            lines = _edited_lines(func, _edits_for(name, patches))
            new_raw = _compile(state.owner, state.attr, state.original_raw, lines, [p.name for p in patches])
        plan[name] = (state, new_raw)
    return plan


def _install(plan: dict[str, tuple[_Target, object]], active_after: dict[str, list[Patch]]) -> None:
    done = []
    try:
        for name, (state, new_raw) in plan.items():
            previous = state.owner.__dict__[state.attr]
            setattr(state.owner, state.attr, new_raw)
            done.append((state, previous))
    except BaseException:
        for state, previous in reversed(done):
            setattr(state.owner, state.attr, previous)
        raise
    for name, (state, new_raw) in plan.items():
        state.installed_raw = new_raw
        state.active = list(active_after[name])
        if state.active:
            _TARGETS[name] = state
        else:
            _TARGETS.pop(name, None)


def installed_release() -> tuple[int, int, int, int] | None:
    """The installed sglang release (from its metadata), parsed; None when unknown."""
    from . import gates

    try:
        return parse_release(gates.sglang_version())
    except Exception:
        return None


def for_release(patch: Patch, release: tuple[int, int, int, int] | None = None) -> Patch:
    """``patch`` with the edits it declares for ``release`` (default: the installed one); raises
    :class:`PatchError` where it declares none (upstream has it, it does not apply, or the release
    lies between its declared ranges: :func:`apply` tries those)."""
    if not patch.releases:
        return patch
    release = installed_release() if release is None else release
    declared = patch.for_release(release)
    if declared is None:
        ranges = ", ".join(r.describe() for r in patch.releases)
        raise PatchError(f"{patch.name} declares nothing for sglang {_shown(release)} (its ranges: {ranges})")
    if not declared.edits:
        raise PatchError(f"{patch.name} has no edits for sglang {_shown(release)}: {declared.why_no_edits()}")
    return patch.at(declared.edits)


def _shown(release) -> str:
    return format_release(release) if release else "(unknown release)"


def _active_targets(name: str) -> list[str]:
    return [t for t, state in _TARGETS.items() if any(p.name == name for p in state.active)]


def is_applied(patch: Patch) -> bool:
    with _LOCK:
        return bool(_active_targets(patch.name))


def apply(patch: Patch, release: tuple[int, int, int, int] | None = None) -> str:
    """Apply every edit ``patch`` declares for ``release`` (default: the installed sglang) or none.
    Returns ``"applied"``, or on a release between two declared ranges, which range's edits matched;
    raises :class:`PatchError`."""
    with _LOCK:
        if is_applied(patch):
            return "applied"
        if not patch.releases:
            _install_view(patch)
            return "applied"
        return _first_fitting(patch, release, _install_view)[1]


def _first_fitting(patch: Patch, release, fit, fit_declared: bool = True) -> tuple[Patch, str]:
    """``(view, status)``: the edits ``patch`` declares for ``release`` (default: the installed one)
    once ``fit(view)`` accepted them (installs them, or checks them against a text; for the range that
    covers the release only if ``fit_declared``). Between two declared ranges, the first neighbour
    whose ``fit`` succeeds (all or nothing; the status says which); raises :class:`PatchError` where
    there are none, or none fits."""
    release = installed_release() if release is None else release
    if patch.for_release(release) is not None or not patch.candidates(release):
        view = for_release(patch, release)  # its declaration, or why there is none
        if fit_declared:
            fit(view)
        return view, "applied"
    failures = []
    for declared in patch.candidates(release):
        view = patch.at(declared.edits)
        try:
            fit(view)
        except PatchError as exc:
            failures.append(f"the edits for {declared.describe()}: {exc}")
            continue
        return view, (f"applied (sglang {_shown(release)} lies between the declared ranges; "
                      f"the edits for {declared.describe()} matched)")
    raise PatchError(f"sglang {_shown(release)} lies between {patch.name}'s declared ranges and matches neither: "
                     + "; ".join(failures))


def _install_view(view: Patch) -> None:
    """Install ``view`` (a patch with one release's edits) on its targets, all or nothing."""
    active_after = {}
    for t in view.targets:
        current = [p for p in (_TARGETS[t].active if t in _TARGETS else []) if p.name != view.name]
        active_after[t] = current + [view]
    _install(_plan(view.targets, active_after), active_after)


def unapply(patch: Patch) -> None:
    """Remove ``patch`` from every target; a target left with no patch gets its original back."""
    with _LOCK:
        targets = _active_targets(patch.name)
        if not targets:
            return
        active_after = {t: [p for p in _TARGETS[t].active if p.name != patch.name] for t in targets}
        _install(_plan(targets, active_after), active_after)


@contextlib.contextmanager
def applied(*patches: Patch) -> Iterator[None]:
    """Apply ``patches`` in order for the block, unapply them in reverse after it (also on errors)."""
    done = []
    try:
        for patch in patches:
            apply(patch)
            done.append(patch)
        yield
    finally:
        for patch in reversed(done):
            unapply(patch)


def active_patches(target: str) -> tuple[str, ...]:
    with _LOCK:
        state = _TARGETS.get(target)
        return tuple(p.name for p in state.active) if state else ()


def original(target: str) -> object:
    """The upstream raw object of ``target`` (function, staticmethod or classmethod)."""
    with _LOCK:
        state = _TARGETS.get(target)
        if state is not None:
            return state.original_raw
    return resolve_target(target)[2]


# --------------------------------------------------------------------------------------------
# Text views (for `diff` and for readers)


def patched_source(target: str, patches: Sequence[Patch]) -> str:
    """The source of ``target`` as ``patches`` (in order, as declared for the installed release)
    leave it, with file indentation."""
    func = _function_of(original(target))
    views = [for_release(p) for p in patches]
    return "\n".join(_edited_lines(func, _edits_for(target, views))) + "\n"


def module_file(module: str) -> str:
    """The file, inside an sglang tree, of ``module`` (``sglang.srt.x`` -> ``sglang/srt/x.py``)."""
    return module.replace(".", "/") + ".py"


def _statements(body):
    """A module's or class body's statements, with those under ``if``/``try``/``with`` blocks
    (still that body's: Python binds their names there too), in source order."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.AsyncWith)) or type(node).__name__ == "TryStar":
            for block in ("body", "orelse", "finalbody"):
                yield from _statements(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _statements(handler.body)


def method_span(text: str, path: Sequence[str]) -> tuple[int, int]:
    """0-based ``[start, end)`` lines of method ``Class.method`` (decorators included) in a module's
    text, found with ``ast`` (what ``inspect.getsourcelines`` returns for the live function): the
    last definition of each name, as Python binds it; raises :class:`PatchError` when the class or
    method is not defined there."""
    node: ast.AST = ast.parse(text)
    for name in path[:-1]:
        found = [n for n in _statements(node.body) if isinstance(n, ast.ClassDef) and n.name == name]
        if not found:
            raise PatchError(f"class {'.'.join(path[:-1])} not found (upstream changed)")
        node = found[-1]
    funcs = [n for n in _statements(node.body) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
             and n.name == path[-1]]
    if not funcs:
        raise PatchError(f"{'.'.join(path)} not defined (upstream changed)")
    func = funcs[-1]
    start = min([func.lineno] + [d.lineno for d in func.decorator_list]) - 1
    return start, func.end_lineno


def edit_file_texts(patches: Sequence[Patch], read, release: tuple[int, int, int, int] | None = None
                    ) -> dict[str, tuple[str, str]]:
    """``{file inside the sglang tree: (its text, the text with every edit of patches applied)}``
    from source text alone (``read(path) -> text or None``: an installed tree, a wheel, a folder),
    with the edits each patch declares for ``release`` (between two declared ranges: the first of the
    neighbours' whose anchors all match this text, as :func:`apply` picks). Raises :class:`PatchError`
    like the engine: a missing file or method, a hunk that does not match exactly once in code."""
    return _edited_texts([_text_view(p, read, release) for p in patches], read)


def _text_view(patch: Patch, read, release) -> Patch:
    if not patch.releases:
        return patch
    # the declared range's edits are checked once, by the caller's edit of all the patches' texts
    return _first_fitting(patch, release, lambda view: _edited_texts([view], read), fit_declared=False)[0]


def _edited_texts(views: Sequence[Patch], read) -> dict[str, tuple[str, str]]:
    by_file: dict[str, list[tuple[int, int, list[str]]]] = {}
    texts: dict[str, str] = {}
    for target in dict.fromkeys(t for v in views for t in v.targets):
        module, path = _split_target(target)
        name = module_file(module)
        if name not in texts:
            text = read(name)
            if text is None:
                raise PatchError(f"{target}: {name} is not in this sglang (upstream changed)")
            texts[name] = text
        lines = texts[name].split("\n")
        try:
            start, end = method_span(texts[name], path)
        except PatchError as exc:
            raise PatchError(f"{target}: {exc}") from None
        method = lines[start:end]
        for edit in _edits_for(target, views):
            method = _apply_hunks(method, edit)
        by_file.setdefault(name, []).append((start, end - start, method))
    result = {}
    for name, spans in by_file.items():
        lines = texts[name].split("\n")
        for start, length, new_lines in sorted(spans, reverse=True):
            lines[start : start + length] = new_lines
        result[name] = (texts[name], "\n".join(lines))
    return result


def evidence_present(read, where: str, text: str) -> bool:
    """Whether ``text`` is in ``where`` of the sglang tree ``read`` gives: a file
    (``sglang/srt/x.py``) or a method (``sglang.srt.x:Class.method``, its lines only)."""
    if ":" not in where:
        return text in (read(where) or "")
    module, path = _split_target(where)
    source = read(module_file(module))
    if source is None:
        return False
    try:
        start, end = method_span(source, path)
    except PatchError:
        return False
    return text in "\n".join(source.split("\n")[start:end])


def _folder_reader(root: str):
    """``read(path)`` over the folder that holds the ``sglang`` package: the text, or None."""

    def read(name: str) -> str | None:
        try:
            with open(os.path.join(root, name), encoding="utf-8") as fh:
                return fh.read()
        except OSError:
            return None

    return read


def installed_sglang_reader():
    """``read(path)`` over the importable sglang tree (no import of sglang itself)."""
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("sglang is not installed")
    return _folder_reader(os.path.dirname(list(spec.submodule_search_locations)[0]))


def source_reader(source: str):
    """``read(path)`` over an sglang release given as a wheel (``.whl``), a folder holding the
    ``sglang`` package, or a checkout (its ``python/`` folder)."""
    import zipfile

    if source.endswith(".whl"):
        archive = zipfile.ZipFile(source)
        names = set(archive.namelist())
        return lambda name: archive.read(name).decode("utf-8") if name in names else None
    root = os.path.join(source, "python") if os.path.isdir(os.path.join(source, "python", "sglang")) else source
    if not os.path.isdir(os.path.join(root, "sglang")):
        raise PatchError(f"{source}: not a wheel, nor a folder with the sglang package")
    return _folder_reader(root)

"""``sglang-hip-decode trace-diff OFF ON``: what a patch set changed in a decode step, kernel by kernel.

Reads two torch.profiler chrome traces (``.json`` or ``.json.gz``, as SGLang's ``/start_profile``
writes them on ROCm or CUDA) and compares their decode steps. No torch needed: the traces are JSON.

How a trace is read:

* **Decode steps** are the ``user_annotation`` spans SGLang's model runner opens around every forward
  while a profiler runs (``step[DECODE bs=4]``, every release from 0.5.11; ``--step-marker`` takes
  another regular expression).
* **GPU work** is every ``kernel``, ``gpu_memcpy`` and ``gpu_memset`` event. Each is attributed to
  a step through the runtime call that launched it (``args.correlation`` shared with a
  ``cuda_runtime`` event such as ``cudaLaunchKernel`` / ``hipLaunchKernel`` /
  ``hipExtModuleLaunchKernel``, whose start lies inside the step on the CPU). A CUDA/HIP graph replay
  is one ``cudaGraphLaunch`` / ``hipGraphLaunch`` whose correlation every kernel of the graph
  carries, so replayed kernels land in the step that replayed them. A kernel without a matching
  launch falls back to the step's ``gpu_user_annotation`` span on the GPU timeline; one in neither
  is outside every decode step and not counted.
* A trace without GPU events (a CPU run) is compared by its ``cpu_op`` events (aten ops) instead
  (``--events ops``; ``--events kernels`` insists on GPU events).
* **Names** are normalised so one kernel is one row however it was instantiated: the return type,
  namespaces and the parameter list go, template arguments fold to ``<...>``
  (``CatArrayBatchedCopy<...>``), and PyTorch's generic elementwise launchers keep the functor that
  says what they do (``elementwise_kernel<...>[direct_copy_kernel_cuda]``). The JSON keeps every raw
  name behind each normalised one.
* **Per layer** divides by the model's layer count: ``--layers N``, or inferred from the OFF trace
  as the most common per-step count among kernels that run more than once per step (a decoder
  layer's kernels each run once per layer; say ``--layers`` when the inference is wrong).

Times are the sums of GPU event durations per step (busy time, not wall time), averaged over the
decode steps of each trace; counts likewise.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
import statistics
from bisect import bisect_right
from pathlib import Path

DEFAULT_STEP_MARKER = r"^step\[DECODE\b"
GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
CPU_OP_CATEGORIES = {"cpu_op", "operator"}
RUNTIME_CATEGORIES = {"cuda_runtime", "cuda_driver", "hip_runtime", "runtime"}
STEP_CATEGORIES = {"user_annotation"}
GPU_STEP_CATEGORIES = {"gpu_user_annotation"}
# PyTorch's generic launchers: the name alone does not say which op ran, the functor in the template does.
_GENERIC_LAUNCHERS = {
    "elementwise_kernel", "vectorized_elementwise_kernel", "unrolled_elementwise_kernel",
    "elementwise_kernel_manual_unroll", "index_elementwise_kernel", "reduce_kernel",
    "vectorized_templated_elementwise_kernel", "Kernel", "Kernel2", "device_kernel",
}
_WRAPPER_FUNCTORS = {"AUnaryFunctor", "BUnaryFunctor", "BinaryFunctor", "UnaryFunctor", "gpu_kernel_impl",
                     "gpu_kernel_impl_nocast"}
_CLASS_LAUNCHERS = {"Kernel", "Kernel2", "device_kernel"}  # CUTLASS: the template's first argument is the kernel
_TEMPLATE_IDS = re.compile(r"(?:[A-Za-z_]\w*::)*([A-Za-z_]\w*)")
_FUNCTOR = re.compile(r"\b([A-Za-z_]\w*?(?:_kernel_cuda|_kernel_impl|_kernel(?=\()|Functor(?:_\w+)?|_functor|Ops))\b")


class TraceError(ValueError):
    """A trace that cannot be read or holds nothing to compare (the message says which and why)."""


def normalise_kernel(name: str) -> str:
    """One name per kernel: no return type, namespaces or parameters; templates folded to ``<...>``."""
    text = name.strip()
    if text.startswith("void "):
        text = text[5:]
    out, depth, i = [], 0, 0
    while i < len(text):  # fold every <...> group, drop a top-level (...) group (the parameter list)
        c = text[i]
        if text.startswith("(anonymous namespace)", i) and depth == 0:
            out.append("(anonymous namespace)")
            i += len("(anonymous namespace)")
            continue
        if c == "<" and not text.startswith("operator", max(0, i - 8)):
            if depth == 0:
                out.append("<...>")
            depth += 1
        elif c == ">" and depth > 0:
            depth -= 1
        elif c == "(" and depth == 0:
            close = _matching(text, i)
            if close is None or not text[close + 1:].lstrip().startswith("::"):
                break  # the parameter list (or a truncated one): nothing after it names the kernel
            i = close + 1  # a function's (...) inside a qualified name: f(int)::{lambda()#1}
            continue
        elif depth == 0:
            out.append(c)
        i += 1
    base = "".join(out).strip()
    base = _last_qualified(base)
    plain = base.split("<", 1)[0]
    if plain in _GENERIC_LAUNCHERS:
        inner = name.split(plain, 1)[-1]
        if plain in _CLASS_LAUNCHERS:  # the first identifier of the template that is not an arch guard
            functor = next((m for m in _TEMPLATE_IDS.finditer(inner.split(">(", 1)[0])
                            if not m.group(1).startswith("enable_sm")), None)
        else:  # the op's own functor, not the wrapper that binds a scalar (AUnaryFunctor<..., MulFunctor<float>>)
            found = list(_FUNCTOR.finditer(inner))
            functor = next((m for m in found if m.group(1) not in _WRAPPER_FUNCTORS), found[0] if found else None)
        if functor:
            base += f"[{functor.group(1)}]"
    return base or name.strip()


def _matching(text: str, open_at: int) -> int | None:
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j
    return None


def _last_qualified(name: str) -> str:
    """The part after the last ``::`` outside a folded template (``at::native::Foo<...>`` -> ``Foo<...>``)."""
    cut = name.rfind("::", 0, name.find("<...>") if "<...>" in name else len(name))
    return name[cut + 2:] if cut >= 0 else name


def load_events(path: str | Path) -> list[dict]:
    """The trace's event list, or a TraceError that says what is wrong with the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, gzip.BadGzipFile) as exc:
            raise TraceError(f"{path}: truncated or damaged gzip ({exc}); was the profile still being written?") from None
    if raw.lstrip()[:1] not in (b"{", b"["):
        raise TraceError(f"{path}: not a chrome trace (neither a JSON object or list nor gzip)")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a chrome trace (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        where = "at its end: truncated" if exc.pos >= len(raw.rstrip()) - 1 else f"at line {exc.lineno}, column {exc.colno}"
        raise TraceError(f"{path}: not valid JSON {where} ({exc.msg}); was the profile still being written?") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise TraceError(f"{path}: not a chrome trace: no 'traceEvents' list (a torch.profiler export has one)")
    return [e for e in events if isinstance(e, dict)]


@dataclasses.dataclass
class Step:
    label: str
    start: float
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    micros: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class TraceSteps:
    path: str
    events: str  # "kernels" or "ops"
    steps: list[Step]
    raw_names: dict[str, set[str]]
    outside: int  # GPU events (or ops) in no decode step

    def per_step(self) -> tuple[dict[str, float], dict[str, float]]:
        """Mean count and mean µs per step of every normalised name."""
        n = len(self.steps)
        counts, micros = collections.Counter(), collections.Counter()
        for s in self.steps:
            counts.update(s.counts)
            micros.update(s.micros)
        return {k: v / n for k, v in counts.items()}, {k: v / n for k, v in micros.items()}


def _is_x(e: dict) -> bool:
    return e.get("ph") == "X" and isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float))


def _cat(e: dict) -> str:
    return str(e.get("cat", "")).lower()


def _correlation(e: dict):
    """The launch correlation id (0 is the tracers' "unknown": treated as none)."""
    value = (e.get("args") or {}).get("correlation")
    return value if value not in (None, 0, "0") else None


def read_steps(path: str | Path, events: str = "auto", step_marker: str = DEFAULT_STEP_MARKER) -> TraceSteps:
    """The decode steps of one trace, with what ran in each."""
    if events not in ("auto", "kernels", "ops"):
        raise ValueError(f"events must be auto, kernels or ops, not {events!r}")
    try:
        marker = re.compile(step_marker)
    except re.error as exc:
        raise TraceError(f"step marker {step_marker!r} is not a regular expression: {exc}") from None
    evs = [e for e in load_events(path) if _is_x(e)]
    if not evs:
        raise TraceError(f"{path}: no complete ('ph': 'X') events: an empty or unfinished profile")
    gpu = [e for e in evs if _cat(e) in GPU_CATEGORIES]
    if events == "kernels" and not gpu:
        raise TraceError(f"{path}: no GPU kernel events (was the profile taken with the GPU activity on?)")
    mode = "kernels" if gpu and events != "ops" else "ops"
    steps_cpu = sorted((e for e in evs if _cat(e) in STEP_CATEGORIES and marker.search(str(e.get("name", "")))),
                       key=lambda e: e["ts"])
    if not steps_cpu:
        labels = collections.Counter(str(e.get("name")) for e in evs if _cat(e) in STEP_CATEGORIES)
        seen = ", ".join(f"{k!r}" for k, _ in labels.most_common(5)) or "none"
        raise TraceError(f"{path}: no decode step spans matching {step_marker!r} (user annotations seen: {seen}); "
                         "profile while the server decodes, or pass --step-marker")
    pids = {e.get("pid") for e in steps_cpu}
    if len(pids) > 1:
        raise TraceError(f"{path}: decode steps from {len(pids)} processes (a merged multi-rank trace?): launch "
                         "correlations are per process, so pass one rank's trace (SGLang writes one per rank: TP-0 ...)")
    steps = [Step(str(e["name"]), e["ts"]) for e in steps_cpu]
    by_thread = collections.defaultdict(list)  # (pid, tid) -> [(start, end, step index)] in time order
    for i, e in enumerate(steps_cpu):
        by_thread[(e.get("pid"), e.get("tid"))].append((e["ts"], e["ts"] + e["dur"], i))
    thread_starts = {k: [s[0] for s in v] for k, v in by_thread.items()}

    def step_at(e: dict) -> int | None:
        """The decode step whose span holds ``e``'s start on ``e``'s own thread (SGLang's spans do not nest)."""
        key = (e.get("pid"), e.get("tid"))
        if key not in by_thread:
            return None
        k = bisect_right(thread_starts[key], e["ts"]) - 1
        if k < 0:
            return None
        lo, hi, i = by_thread[key][k]
        return i if lo <= e["ts"] <= hi else None

    raw_names: dict[str, set[str]] = collections.defaultdict(set)
    outside = 0
    if mode == "ops":
        for e in evs:
            if _cat(e) in CPU_OP_CATEGORIES:
                i = step_at(e)
                if i is None:
                    outside += 1
                    continue
                name = str(e.get("name"))
                raw_names[name].add(name)
                steps[i].counts[name] += 1
                steps[i].micros[name] += e["dur"]
        return TraceSteps(str(path), mode, steps, dict(raw_names), outside)

    launch_step, launched = {}, set()  # correlation -> step; every correlation a runtime call carries
    for e in evs:
        if _cat(e) in RUNTIME_CATEGORIES and _correlation(e) is not None:
            launched.add(_correlation(e))
            i = step_at(e)
            if i is not None:
                launch_step[_correlation(e)] = i
    gpu_spans = collections.defaultdict(list)  # (step label, GPU stream) -> its GPU-timeline spans
    for e in evs:
        if _cat(e) in GPU_STEP_CATEGORIES and marker.search(str(e.get("name", ""))):
            gpu_spans[(str(e["name"]), e.get("pid"), e.get("tid"))].append((e["ts"], e["ts"] + e["dur"]))
    # Kineto writes one GPU span per step and stream: the k-th span of a label on a stream is step k's
    order = collections.defaultdict(list)
    for i, s in enumerate(steps):
        order[s.label].append(i)
    gpu_step_index = []
    for (label, _pid, _tid), v in gpu_spans.items():
        for k, (lo, hi) in enumerate(sorted(v)):
            if k < len(order[label]):
                gpu_step_index.append((lo, hi, order[label][k]))
    gpu_step_index.sort()
    for e in gpu:
        corr = _correlation(e)
        i = launch_step.get(corr)
        if i is None and corr not in launched:  # no launch in the trace: its place on the GPU timeline decides
            i = next((k for lo, hi, k in gpu_step_index if lo <= e["ts"] <= hi), None)
        if i is None:
            outside += 1
            continue
        raw = str(e.get("name"))
        name = raw if _cat(e) != "kernel" else normalise_kernel(raw)
        raw_names[name].add(raw)
        steps[i].counts[name] += 1
        steps[i].micros[name] += e["dur"]
    if not any(s.counts for s in steps):
        raise TraceError(f"{path}: {len(steps)} decode steps, but no GPU event could be attributed to any of them "
                         "(no launch correlation and no gpu_user_annotation spans)")
    return TraceSteps(str(path), mode, steps, dict(raw_names), outside)


def infer_layers(trace: TraceSteps) -> int:
    """The most common per-step count among names that run more than once in every step (ties: the larger)."""
    per_step = [s.counts for s in trace.steps]
    seen = collections.Counter(k for c in per_step for k in c)
    common = {k for k, n in seen.items() if 2 * n > len(per_step)}  # in most steps (one cut-off step does not decide)
    counts = collections.Counter(round(statistics.median(c[k] for c in per_step if k in c)) for k in common)
    counts = {n: m for n, m in counts.items() if n >= 2}
    if not counts:
        return 1
    return max(counts, key=lambda n: (counts[n], n))


def diff(off: TraceSteps, on: TraceSteps, layers: int | None = None) -> dict:
    """Per decode step and per layer, every name's count and µs in both traces, and what changed."""
    if off.events != on.events:
        raise TraceError(f"cannot compare {off.events} ({off.path}) with {on.events} ({on.path}): "
                         "profile both arms the same way, or pass --events ops")
    inferred = layers is None
    layers = infer_layers(off) if inferred else layers
    if layers < 1:
        raise ValueError(f"layers must be >= 1, not {layers}")
    (c_off, t_off), (c_on, t_on) = off.per_step(), on.per_step()
    rows = []
    for name in sorted(set(c_off) | set(c_on)):
        a, b = c_off.get(name, 0.0), c_on.get(name, 0.0)
        ua, ub = t_off.get(name, 0.0), t_on.get(name, 0.0)
        timed = abs(ub - ua) > max(0.5, 0.05 * ua)  # count unchanged, time changed beyond noise
        status = ("removed" if b == 0 else "added" if a == 0 else "changed" if a != b
                  else ("slower" if ub > ua else "faster") if timed else "same")
        rows.append({
            "name": name, "status": status, "count_off": a, "count_on": b,
            "us_off": t_off.get(name, 0.0), "us_on": t_on.get(name, 0.0),
            "delta_us": t_on.get(name, 0.0) - t_off.get(name, 0.0),
            "count_off_per_layer": a / layers, "count_on_per_layer": b / layers,
            "raw_names": sorted(off.raw_names.get(name, set()) | on.raw_names.get(name, set())),
        })
    rows.sort(key=lambda r: (r["status"] == "same", -abs(r["delta_us"]), r["name"]))
    net = sum(r["delta_us"] for r in rows)

    def side(t: TraceSteps, counts, micros):
        return {"path": t.path, "decode_steps": len(t.steps), "events": t.events,
                "step_labels": dict(collections.Counter(s.label for s in t.steps)),
                "per_step": {"count": sum(counts.values()), "us": sum(micros.values())},
                "outside_decode_steps": t.outside,
                "steps": [{"label": s.label, "count": sum(s.counts.values()), "us": sum(s.micros.values())}
                          for s in t.steps]}

    return {
        "off": side(off, c_off, t_off), "on": side(on, c_on, t_on),
        "layers": layers, "layers_inferred": inferred, "events": off.events,
        "removed": [r["name"] for r in rows if r["status"] == "removed"],
        "added": [r["name"] for r in rows if r["status"] == "added"],
        "net_us_per_step": net, "net_us_per_layer": net / layers, "rows": rows,
    }


def format_count(x: float) -> str:
    """A per-step or per-layer count: whole when it is, else two decimals."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}"


def render(result: dict, show_all: bool = False) -> str:
    """The text report: one line per name that changed (every name with ``show_all``), then the net."""
    off, on, layers = result["off"], result["on"], result["layers"]
    unit = "kernel" if result["events"] == "kernels" else "op"
    lines = [
        f"OFF {off['path']}: {off['decode_steps']} decode steps ({', '.join(off['step_labels'])})",
        f"ON  {on['path']}: {on['decode_steps']} decode steps ({', '.join(on['step_labels'])})",
        f"per decode step, mean over its steps; per layer = / {layers} layers"
        f"{' (inferred; --layers to set)' if result['layers_inferred'] else ''}; µs = "
        + ("GPU busy time" if unit == "kernel" else "CPU op time (inclusive)"),
        "",
    ]
    header = [unit, "status", "count off → on", "per layer", "µs off → on", "Δ µs/step"]
    body = []
    for r in result["rows"]:
        if r["status"] == "same" and not show_all:
            continue
        body.append([r["name"], r["status"], f"{format_count(r['count_off'])} → {format_count(r['count_on'])}",
                     f"{format_count(r['count_off_per_layer'])} → {format_count(r['count_on_per_layer'])}",
                     f"{r['us_off']:.1f} → {r['us_on']:.1f}", f"{r['delta_us']:+.1f}"])
    if body:
        widths = [max(len(row[i]) for row in body + [header]) for i in range(len(header))]
        fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in body]
    else:
        lines.append(f"no {unit} changed count between the two traces")
    same = sum(1 for r in result["rows"] if r["status"] == "same")
    lines += [
        "",
        f"removed: {', '.join(result['removed']) or 'none'}",
        f"appeared: {', '.join(result['added']) or 'none'}",
        f"{unit}s per step: {format_count(off['per_step']['count'])} → {format_count(on['per_step']['count'])}"
        f" ({same} unchanged{'' if show_all else ', not listed: --all'})",
        f"net: {result['net_us_per_step']:+.1f} µs per decode step ({result['net_us_per_layer']:+.2f} µs per layer)",
    ]
    for side, name in ((off, "OFF"), (on, "ON")):
        if side["outside_decode_steps"]:
            lines.append(f"{name}: {side['outside_decode_steps']} {unit}s outside every decode step (not counted)")
    return "\n".join(lines)


def compare(off_path, on_path, *, layers: int | None = None, events: str = "auto",
            step_marker: str = DEFAULT_STEP_MARKER) -> dict:
    """Read both traces and diff them (what ``trace-diff`` prints, as a dict)."""
    return diff(read_steps(off_path, events, step_marker), read_steps(on_path, events, step_marker), layers)

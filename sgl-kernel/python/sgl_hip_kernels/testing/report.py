"""One table format for every benchmark: ``{"benchmark", "device", "providers", "columns", "rows"}``."""

from __future__ import annotations


_UNITS = (("_us", "µs"), ("_ms", "ms"), ("_GBps", "GB/s"), ("GBps", "GB/s"), ("_bytes", "B"), ("bytes", "B"),
          ("pct_", "%"), ("TFLOPs", "TFLOP/s"))


def _header(column: str) -> str:
    """A column name with its unit: ``ours_us`` -> ``ours (µs)``, ``pct_copy_bw`` -> ``copy_bw (%)``."""
    for marker, unit in _UNITS:
        if marker.startswith("_") and column.endswith(marker) and column != marker[1:]:
            return f"{column[: -len(marker)]} ({unit})"
        if marker.endswith("_") and column.startswith(marker):
            return f"{column[len(marker):]} ({unit})"
        if column == marker:
            return unit if unit != "B" else column
    return column


def _cell(value) -> str:
    """Numbers to at most 4 significant digits (integers whole, with thousands separators)."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value)


def render(result: dict) -> str:
    columns = result["columns"]
    headers = [_header(c) for c in columns]
    rows = [[_cell(r.get(c)) for c in columns] for r in result["rows"]]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = [
        f"## {result['benchmark']}",
        f"device: {result['device']}; providers: {result['providers']}",
        "  ".join(h.rjust(w) for h, w in zip(headers, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def emit(result: dict, json_path: str | None) -> None:
    """Write ``result`` as JSON to ``json_path`` (how ``make bench`` collects it), else print its table."""
    if json_path:
        import json

        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    else:
        print(render(result))


def bench_args(doc: str, argv=None, repeats: int = 100, extra=None):
    """The options every benchmark takes: ``--quick`` (CI's shapes), ``--json FILE`` (``make bench``
    collects it), ``--repeats`` (timed rounds per arm); ``extra(parser)`` adds a benchmark's own."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (what CI runs)")
    parser.add_argument("--json", help="write the result table here as JSON")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds per arm (GPU)")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)

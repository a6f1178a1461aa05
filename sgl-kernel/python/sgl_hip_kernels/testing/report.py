"""One table format for every benchmark: ``{"benchmark", "device", "providers", "columns", "rows"}``."""

from __future__ import annotations


def render(result: dict) -> str:
    columns = result["columns"]
    rows = [[str(r.get(c, "")) for c in columns] for r in result["rows"]]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = [
        f"## {result['benchmark']}",
        f"device: {result['device']}; providers: {result['providers']}",
        "  ".join(c.rjust(w) for c, w in zip(columns, widths)),
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

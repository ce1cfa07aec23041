"""Generated README sections: the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` is replaced
by a tool's rendering of its results JSON (the demo's table, vgs-analyze's angles) or of a declaration in the
code (the loss keywords' table: ``python -m vgs_train.tools.readme README.md``), never edited by hand."""

from __future__ import annotations

import json


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(src: str, name: str, text: str) -> str | None:
    """``src`` with the text between the ``name`` markers replaced by ``text`` (None without the markers)."""
    start, end = markers(name)
    if start not in src or end not in src:
        return None
    head, rest = src.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{text}\n{end}{tail}"


def write_section(path: str, name: str, text: str) -> None:
    """Replace the ``name`` section of the file at ``path``; SystemExit naming the markers when it has none."""
    with open(path) as f:
        src = f.read()
    new = replace_section(src, name, text)
    if new is None:
        start, end = markers(name)
        raise SystemExit(f"{path}: no {start} / {end} markers")
    with open(path, "w") as f:
        f.write(new)
    print(f"wrote the {name} section of {path}")


def format_rows(rows: list[list[str]]) -> str:
    """A plain-text table of cells (header first): the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table of cells (header first)."""
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |"
                                                                           for r in rows[1:]]


def report(results_json: str, render, name: str, section, readme: str | None) -> int:
    """``--report``: print ``render(results)`` of a finished run's JSON and, given ``readme``, write its ``name``
    section from ``section(results)``."""
    with open(results_json) as f:
        results = json.load(f)
    print(render(results))
    if readme:
        write_section(readme, name, section(results))
    return 0


def main(argv: list[str] | None = None) -> None:
    """``python -m vgs_train.tools.readme README.md``: regenerate the sections that come from code, not from a run
    (the loss keywords' table, from their one declaration in ``vgs_kernels.options``)."""
    import argparse

    from vgs_kernels.options import keyword_table

    ap = argparse.ArgumentParser(prog="python -m vgs_train.tools.readme", description=main.__doc__)
    ap.add_argument("readme", help="the README to update in place")
    args = ap.parse_args(argv)
    write_section(args.readme, "keywords", keyword_table())


if __name__ == "__main__":
    main()

"""Build a notebook from a list of (kind, source) pairs: used to author the chapters.

    python tools/nb.py  # not run by the course; chapters are plain .ipynb files in notebooks/
"""

from __future__ import annotations

import nbformat


def build(cells: list[tuple[str, str]], path: str) -> None:
    """kind is "md", "code" or "params" (a code cell tagged ``parameters`` for papermill)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in cells:
        source = source.strip("\n")
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i:02d}"
    nbformat.validate(nb)
    nbformat.write(nb, path)

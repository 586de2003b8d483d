"""Plots as PNG files: matplotlib without a display, each figure written under a temporary name and renamed."""
import os
import tempfile
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported only when a stage draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> str:
    """Saves a PNG under a temporary name and renames it into place; returns the path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    figure.savefig(tmp, dpi=110, bbox_inches="tight")
    pyplot().close(figure)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return str(path)

"""PNG plots next to report/index.md: matplotlib's object API with the Agg canvas (no pyplot
state, safe in any process). matplotlib is optional: without it each plot becomes a note."""
from __future__ import annotations

import io
import logging
from collections.abc import Callable

from automem_jax import storage
from automem_jax.report.reading import Reader

log = logging.getLogger(__name__)


class Plots:
    def __init__(self, reader: Reader, enabled: bool):
        self.reader = reader
        self.enabled = enabled
        self.written: list[str] = []
        self.problem = ""
        if enabled:
            try:  # optional: imported here so a report without it still gets its tables
                import matplotlib  # noqa: F401
            except ImportError as e:
                self.enabled, self.problem = False, f"matplotlib is not installed ({e})"
        else:
            self.problem = "plots are off (config report.plots = False)"

    def save(self, name: str, draw: Callable, figsize=(7.0, 4.0)) -> str:
        """Draws into a new figure, writes report/<name>; returns a Markdown image line or a note."""
        if not self.enabled:
            return f"_(plot `{name}` not drawn: {self.problem})_"
        # Imported only once a plot is drawn: matplotlib is optional (checked in __init__).
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        try:
            fig = Figure(figsize=figsize, dpi=100)
            FigureCanvasAgg(fig)
            draw(fig)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            storage.write_bytes(self.reader.path("report", name), buf.getvalue())
        except Exception as e:  # a plot is decoration: its failure is reported, not raised
            log.warning("report: plot %s failed: %s", name, e)
            return f"_(plot `{name}` failed: {type(e).__name__}: {e})_"
        self.written.append(name)
        return f"![{name}]({name})"

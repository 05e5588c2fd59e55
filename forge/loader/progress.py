"""The progress bar a model load shows on stderr, like vLLM's: only when stderr is a terminal (tqdm's
disable=None), and erased when the load is done so that the output starts on a clean line."""

import sys
from pathlib import Path

from tqdm.auto import tqdm


def load_progress(total: int, path: Path) -> tqdm:
    """A bar over `total` tensors of the model at `path` (use as a context manager; `.update()` per tensor)."""
    return tqdm(total=total, desc=f"Loading {Path(path).name}", unit=" tensors", file=sys.stderr, disable=None,
                leave=False, dynamic_ncols=True)

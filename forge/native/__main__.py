"""`python -m forge.native`: build the CPU kernels now (make install runs it), ahead of the first run."""

import sys

from forge import native

if native.library() is not None:
    print("forge native CPU kernels: ready", file=sys.stderr)
else:
    print(f"forge native CPU kernels: not available ({native.why_unavailable()}); using torch's kernels", file=sys.stderr)

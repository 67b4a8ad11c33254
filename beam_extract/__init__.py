"""beam-extract: per-token transformer activations from text datasets, as an Apache Beam pipeline."""

import os
import sys

# Set by `python -m beam_extract` for itself and the worker processes it starts (they inherit the
# environment): those processes run without torch, which transformers imports whenever it is
# installed, for tokenizers and configs that use none of it (measured: 466 MiB of peak RSS and
# 1.3 CPU-s per process). Read here, the first of our modules a worker imports, before transformers.
WITHOUT_TORCH = "BEAM_EXTRACT_WITHOUT_TORCH"


def run_without_torch() -> None:
    """Marks torch absent in this process and in the worker processes it starts."""
    os.environ[WITHOUT_TORCH] = "1"
    sys.modules.setdefault("torch", None)


if os.environ.get(WITHOUT_TORCH) == "1":
    run_without_torch()

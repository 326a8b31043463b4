"""layerscope: experiments on transformer internals, as a Snakemake workflow.

The library holds all logic; the workflow's rules and scripts only wire files to it.
"""

import os

# Idle OpenMP threads sleep instead of spinning. Read by libgomp when torch loads, so it holds for
# every workflow script (each imports layerscope before torch); set it yourself to override.
# On a CPU shared by several jobs, spinning threads made small-op workloads (jvp passes, short
# sequences, per-variant forwards) several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


class LayerscopeError(Exception):
    """An error caused by the user's input (config, prompt file, model), with a clear message."""

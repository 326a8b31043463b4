"""layerscope: experiments on transformer internals, as a Snakemake workflow.

The library holds all logic; the workflow's rules and scripts only wire files to it.
"""

__version__ = "0.1.0"


class LayerscopeError(Exception):
    """An error caused by the user's input (config, prompt file, model), with a clear message."""

"""Causal tracing (the knockout-era implementation lives in :mod:`layerscope.engines._tracing_legacy` until
knockout stops importing it)."""

from layerscope.engines._tracing_legacy import (  # noqa: F401
    TraceResult, causal_trace, restored_probabilities, trace_prompts,
)

"""Every weight matrix of a model, named once: the inventory the weight experiments analyse.

:func:`weight_inventory` lists each 2-D weight of the whole model exactly once — the block
projections ``q k v o gate up down`` (fused parameters split into their row blocks, as
:meth:`ModelAdapter.projections` does; T5 decoder blocks add ``cross_q cross_k cross_v
cross_o``), the token embedding (``embed``; a ViT's patch-embedding convolution,
``patch_embed``, as [out, in·kh·kw]), learned position and token-type embeddings
(``position_embed``, ``token_type_embed``), a ViT's class and mask tokens (``class_token``,
``mask_token``, one row each), T5's relative position bias tables (``relative_bias``,
[buckets, heads]), the unembedding when it is not tied to the embedding (``unembed``) and
BERT's pooler (``pooler``). A weight of two or more dimensions that fits none of these is
still listed, as type ``other``, so nothing is silently skipped; the tests require that no
supported family has one.

Block matrices are named ``{type}.{layer}`` (``q.12``), model-level ones by their type
(``embed``). In a multi-stack model (T5) the stack qualifies both: block matrices have type
``{stack}.{type}`` and name ``{stack}.{layer}.{type}`` (``decoder.3.cross_q``, layer 3 of the
decoder), the relative bias tables are ``encoder.relative_bias`` and ``decoder.relative_bias``.
Matrices are [out, in] for projections and [rows, d_model] for embeddings.

:class:`WeightEditor` replaces block projections in place (e.g. by a quantized copy) and
restores them bit for bit; :func:`weights_digest` checks that a model's weights are unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from layerscope.engines.spectra import single_thread
from layerscope.model.adapter import (
    CROSS_ATTENTION_TYPES, PROJECTION_TYPES, ModelAdapter, ProjectionRef, oriented, projection_matrix, qualify,
)

T = TypeVar("T")
R = TypeVar("R")

MODEL_TYPES = ("embed", "patch_embed", "position_embed", "token_type_embed", "class_token", "mask_token",
               "relative_bias", "unembed", "pooler", "other")
BLOCK_TYPES = PROJECTION_TYPES + CROSS_ATTENTION_TYPES


def base_type(mtype: str) -> str:
    """The projection type without its stack (``decoder.cross_q`` → ``cross_q``)."""
    return mtype.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class WeightMatrix:
    """One analysed matrix: where it lives and what it is."""

    name: str  # "q.3" for block matrices, the type for model-level ones
    type: str  # a projection type or one of MODEL_TYPES
    layer: int | None  # block index; None for model-level matrices
    param: str  # parameter name relative to the model root
    rows: tuple[int, ...] | slice | None = None  # output rows of a fused parameter
    transposed: bool = False  # GPT-2 Conv1D stores [in, out]


def weight_inventory(adapter: ModelAdapter) -> list[WeightMatrix]:
    """Every 2-D weight of the model exactly once (see module docstring), in model order."""
    model = adapter.model
    params = dict(model.named_parameters())  # tied weights appear once
    name_of = {id(p): n for n, p in params.items()}
    all_params = dict(model.named_parameters(remove_duplicate=False))
    out: list[WeightMatrix] = []
    for name, mtype, param in adapter.model_matrices():
        canonical = name_of.get(id(all_params[param]))
        if canonical is not None and canonical not in {w.param for w in out}:
            out.append(WeightMatrix(name, mtype, None, canonical))
    for i in range(adapter.n_layers):
        stack, layer = adapter.block_site(i)
        for ref in adapter.projection_refs(i):
            name = f"{stack}.{layer}.{ref.type}" if stack else f"{ref.type}.{i}"
            out.append(WeightMatrix(name, qualify(stack, ref.type), layer, ref.param, ref.rows, ref.transposed))
    if adapter.unembed is not None and not adapter.facts.tied_embeddings:
        out.append(WeightMatrix("unembed", "unembed", None, name_of[id(adapter.unembed.weight)]))
    covered = {w.param for w in out}
    for name in adapter.linear_weight_names():
        if name in covered:
            continue
        kind = "pooler" if "pooler" in name.split(".") else "other"
        used = {w.name for w in out}
        out.append(WeightMatrix(kind if kind == "pooler" and kind not in used else name, kind, None, name))
    names = [w.name for w in out]
    assert len(names) == len(set(names)), "weight names must be unique"
    return out


class WeightSource:
    """Reads the matrices of an inventory from a loaded model (views where possible, no copies kept)."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self._params = dict(adapter.model.named_parameters(remove_duplicate=False))

    def matrix(self, w: WeightMatrix) -> torch.Tensor:
        return projection_matrix(self._params[w.param].detach(), w)

    def __iter__(self) -> Iterator[tuple[WeightMatrix, torch.Tensor]]:
        for w in weight_inventory(self.adapter):
            yield w, self.matrix(w)


def numel(w: WeightMatrix, params: dict[str, torch.Tensor]) -> int:
    """Elements of the parameter that the matrix covers (all of it unless it is a row block)."""
    p = params[w.param]
    out_dim = p.shape[1] if w.transposed else p.shape[0]
    in_dim = p.shape[0] if w.transposed else p.shape[1]
    if w.rows is None:
        return p.numel()
    n_rows = len(range(*w.rows.indices(out_dim))) if isinstance(w.rows, slice) else len(w.rows)
    return n_rows * in_dim


# ---------------------------------------------------------------------------- editing weights in place


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    state = model.state_dict(keep_vars=False)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class WeightEditor:
    """Replace chosen block projections in place; :meth:`variant` restores them exactly afterwards."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.params = dict(adapter.model.named_parameters(remove_duplicate=False))
        self._saved: dict[str, torch.Tensor] = {}
        self.refs = {layer: {ref.type: ref for ref in adapter.projection_refs(layer)}
                     for layer in range(adapter.n_layers)}

    def types(self) -> list[str]:
        """Projection types this model has, in canonical order."""
        present = {t for refs in self.refs.values() for t in refs}
        return [t for t in PROJECTION_TYPES if t in present]

    def n_weights(self, layer: int, types: Sequence[str] | None = None) -> int:
        out = 0
        for t, ref in self.refs[layer].items():
            if types is None or t in types:
                out += self.matrix(ref).numel()
        return out

    def matrix(self, ref: ProjectionRef) -> torch.Tensor:
        """The projection's current [out, in] matrix (fused parameters: its row block)."""
        return projection_matrix(self.params[ref.param].data, ref)

    def edit(self, layer: int, types: Sequence[str] | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the given projection types of one block (None: all) by ``fn`` of their [out, in] matrix."""
        for t, ref in self.refs[layer].items():
            if types is not None and t not in types:
                continue
            if ref.param not in self._saved:
                self._saved[ref.param] = self.params[ref.param].data.clone()
            new = fn(self.matrix(ref))
            view = oriented(self.params[ref.param].data, ref)
            with torch.no_grad():
                if ref.rows is None:
                    view.copy_(new)
                elif isinstance(ref.rows, slice):
                    view[ref.rows] = new
                else:  # index_put_ on a (possibly transposed) view writes through to the parameter
                    view[list(ref.rows)] = new

    def restore(self) -> None:
        with torch.no_grad():
            for name, data in self._saved.items():
                self.params[name].data.copy_(data)
        self._saved.clear()

    @contextlib.contextmanager
    def variant(self) -> Iterator["WeightEditor"]:
        try:
            yield self
        finally:
            self.restore()


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on ``workers`` threads (default: torch's thread count), in order.

    Each item runs single-threaded (torch releases the GIL inside its kernels), so the
    cores work on different matrices instead of synchronising inside one small LAPACK
    call: the same total CPU time as one thread, and no spin-waiting when the machine is
    busy. Results do not depend on the number of workers.
    """
    items = list(items)
    workers = torch.get_num_threads() if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        with single_thread():
            return [fn(x) for x in items]

    def single(x):
        # OpenMP's thread count is per thread: a worker would otherwise start with the machine default
        torch.set_num_threads(1)
        return fn(x)

    with single_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(single, items))


def return_large_frees_to_the_os(threshold: int = 4 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes or more by mmap (glibc's M_MMAP_THRESHOLD).

    The weight analyses convert one matrix after another to float64 on several threads.
    glibc otherwise raises its mmap threshold after the first large free, and each worker
    thread's heap arena then keeps the freed copies: the process grows by hundreds of MiB
    beyond the model. A fixed threshold returns every freed large block at once. Called by
    the weight experiments' stage functions (one job, one process); a no-op elsewhere.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False

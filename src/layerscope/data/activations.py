"""The activation cache: the residual stream at every block boundary, for every token.

``resid.safetensors`` holds one tensor per site, ``resid.0 … resid.L``, each
[n_tokens, d_model] (see :mod:`layerscope.model.adapter` for the site names), so a reader can
load one layer without touching the others. ``tokens.parquet`` has one row per token:
prompt id, category, position, token id and text, role (system / template / prompt /
completion), whether the position predicts a completion token (``is_target``: position
t−1 for the completion token at t) and the row index into the tensors.

Extraction streams: the file's header is written first (every size is known from the
token ids), then each batch's rows are written into place layer by layer, so peak memory
depends on the batch, not on the prompt set. Both files are written under temporary names
and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError, __version__
from layerscope.model.adapter import ModelAdapter
from layerscope.model.generate import token_roles
from layerscope.jobs.io import atomic_path
from layerscope.progress import track

log = logging.getLogger(__name__)

RESID_FILE = "resid.safetensors"
TOKENS_FILE = "tokens.parquet"
SITE_DOC = (
    "resid.i is the residual stream entering block i; resid.L is the last block's output before the final norm"
)
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def site(layer: int) -> str:
    return f"resid.{layer}"


@dataclass
class TokenSequence:
    prompt_id: str
    category: str
    ids: list[int]
    roles: list[str]


def sequences_from_completions(completions: pd.DataFrame) -> list[TokenSequence]:
    out = []
    for row in completions.itertuples(index=False):
        ids = list(row.prompt_ids) + list(row.completion_ids)
        roles = token_roles(
            len(ids), (row.system_start, row.system_end), (row.prompt_start, row.prompt_end), row.n_prompt_tokens
        )
        out.append(TokenSequence(row.prompt_id, row.category, [int(i) for i in ids], roles))
    return out


def sequences_from_prompts(tokenizer, prompts) -> list[TokenSequence]:
    """Encoder input: each prompt's text with the tokenizer's special tokens (no completion)."""
    out = []
    for p in prompts:
        enc = tokenizer(p.text, add_special_tokens=True, return_special_tokens_mask=True)
        roles = ["template" if special else "prompt" for special in enc["special_tokens_mask"]]
        out.append(TokenSequence(p.id, p.category, list(enc["input_ids"]), roles))
    return out


def storage_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _TORCH_DTYPES[name]


def tokens_table(sequences: Sequence[TokenSequence], tokenizer) -> pd.DataFrame:
    rows = []
    row_index = 0
    for seq in sequences:
        n = len(seq.ids)
        first_completion = next((t for t, r in enumerate(seq.roles) if r == "completion"), n)
        texts = tokenizer.batch_decode([[i] for i in seq.ids])
        for t in range(n):
            is_target = t + 1 < n and seq.roles[t + 1] == "completion"
            rows.append(
                (
                    row_index, seq.prompt_id, seq.category, t, seq.ids[t], texts[t], seq.roles[t], is_target,
                    seq.ids[t + 1] if is_target else -1, (t + 1 - first_completion) if is_target else -1,
                )
            )
            row_index += 1
    frame = pd.DataFrame(
        rows,
        columns=["row", "prompt_id", "category", "position", "token_id", "token", "role", "is_target",
                 "target_id", "target_index"],
    )
    return frame.astype({"row": "int64", "position": "int32", "token_id": "int64", "target_id": "int64",
                         "target_index": "int32"})


class _SafetensorsStream:
    """A safetensors file whose header is written first and whose rows are filled in place."""

    def __init__(self, path: Path, names: list[str], shape: tuple[int, int], dtype: torch.dtype, metadata: dict):
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = shape[1] * self.itemsize
        tensor_bytes = shape[0] * self.row_bytes
        header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
        self.offsets = {}
        for k, name in enumerate(names):
            begin = k * tensor_bytes
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, begin + tensor_bytes]}
            self.offsets[name] = begin
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.data_start = 8 + len(blob)
        self.dtype = dtype
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, struct.pack("<Q", len(blob)) + blob)
        os.ftruncate(self.fd, self.data_start + len(names) * tensor_bytes)

    def write_rows(self, name: str, first_row: int, rows: torch.Tensor) -> None:
        data = rows.detach().to(dtype=self.dtype, device="cpu").contiguous()
        buffer = data.view(torch.uint8).numpy() if data.dtype == torch.bfloat16 else data.numpy()
        os.pwrite(self.fd, buffer.tobytes(), self.data_start + self.offsets[name] + first_row * self.row_bytes)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Sequence indices grouped by similar length (longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def extract_activations(
    adapter: ModelAdapter,
    tokenizer,
    sequences: Sequence[TokenSequence],
    resid_path: str | Path,
    tokens_path: str | Path,
    *,
    batch_size: int = 8,
    storage: str = "auto",
    metadata: dict | None = None,
) -> dict:
    """Write resid.safetensors and tokens.parquet for ``sequences``; returns the metadata written."""
    if not sequences:
        raise LayerscopeError("no sequences to extract")
    device = adapter.device
    dtype = storage_dtype(storage, device)
    lengths = [len(s.ids) for s in sequences]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    n_tokens, d = int(sum(lengths)), adapter.facts.d_model
    names = [site(i) for i in range(adapter.n_layers + 1)]
    meta = {
        **(metadata or {}),
        "layerscope_version": __version__,
        "n_layers": adapter.n_layers,
        "d_model": d,
        "n_tokens": n_tokens,
        "n_sequences": len(sequences),
        "storage_dtype": str(dtype).removeprefix("torch."),
        "compute_dtype": str(adapter.dtype).removeprefix("torch."),
        "model_type": adapter.facts.model_type,
        "sites": SITE_DOC,
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = tokens_table(sequences, tokenizer)
    with atomic_path(resid_path) as resid_tmp, atomic_path(tokens_path) as tokens_tmp:
        stream = _SafetensorsStream(resid_tmp, names, (n_tokens, d), dtype, meta)
        try:
            for batch in track(_batches(lengths, batch_size), "extract activations", total=len(sequences),
                               weight=len, unit="sequences"):
                width = max(lengths[i] for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # right padding: real tokens never see the pads
                    ids[row, : lengths[i]] = torch.tensor(sequences[i].ids)
                    mask[row, : lengths[i]] = 1
                inputs = adapter.capture_block_inputs(ids.to(device), mask.to(device))
                hidden = inputs.resid0
                for layer in range(adapter.n_layers + 1):
                    if layer > 0:
                        hidden = adapter.run_block(layer - 1, hidden, inputs)
                    for row, i in enumerate(batch):
                        stream.write_rows(names[layer], int(starts[i]), hidden[row, : lengths[i]])
        finally:
            stream.close()
        tokens.to_parquet(tokens_tmp, index=False)
    return meta


class ActivationCache:
    """Lazy reader of an activation cache folder (one layer at a time)."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        path = self.directory / RESID_FILE
        if not path.is_file():
            raise LayerscopeError(f"no activation cache at {path}")
        self._file = safe_open(str(path), framework="pt")
        self.metadata: dict[str, str] = self._file.metadata() or {}
        self.n_layers = int(self.metadata["n_layers"])
        self.d_model = int(self.metadata["d_model"])
        self.n_tokens = int(self.metadata["n_tokens"])
        self._tokens: pd.DataFrame | None = None

    @property
    def tokens(self) -> pd.DataFrame:
        if self._tokens is None:
            self._tokens = pd.read_parquet(self.directory / TOKENS_FILE)
        return self._tokens

    def resid(self, layer: int, rows: slice | np.ndarray | None = None, dtype=torch.float32) -> torch.Tensor:
        """resid.{layer} as a tensor; ``rows`` a slice (read lazily) or an index array."""
        if not 0 <= layer <= self.n_layers:
            raise IndexError(f"layer {layer} outside 0…{self.n_layers}")
        if isinstance(rows, slice):
            tensor = self._file.get_slice(site(layer))[rows]
        else:
            tensor = self._file.get_tensor(site(layer))
            if rows is not None:
                tensor = tensor[torch.from_numpy(np.array(rows, dtype=np.int64))]
        return tensor.to(dtype)

    def target_rows(self) -> np.ndarray:
        """Rows whose position predicts a completion token."""
        return self.tokens.loc[self.tokens["is_target"], "row"].to_numpy()

"""Causal tracing as Meng et al. (2022, "Locating and Editing Factual Associations in GPT")
define it: which hidden states carry a fact from its subject to the answer.

A factual-recall prompt is completion-style text with an annotated subject and answer
("The Eiffel Tower is located in the city of" / "Eiffel Tower" / "Paris"); no chat template.

* **Tokens**: the text as the tokenizer encodes it (with the BOS token it adds, if any). The
  subject tokens are those whose character span overlaps the subject's first occurrence in
  the text (offset mapping): positions b … e−1.
* **Answer token**: the first token after the text's tokens when ``text + " " + answer`` is
  encoded (the answer as a continuation of the text). A prompt whose tokens are not a prefix
  of that encoding, or whose answer token is whitespace only, is skipped with the reason.
* **Clean run**: p_clean = P(answer token) at the last position.
* **Corrupted runs**: Gaussian noise N(0, σ²) added to ``resid.0`` (what block 0 receives:
  the token embeddings, plus position embeddings where the model adds them) at the subject
  positions only, σ = ``noise`` × the standard deviation of the ``resid.0`` entries at the
  subject tokens of the prompt set (:func:`noise_std`); ``samples`` seeded draws, run as one
  batch. p_corrupted = the mean over draws of P(answer).
* **Restored runs**: for block l (l = 0 … L−1) and position t, the corrupted run with the
  output of block l at position t replaced by the clean one, run on through blocks l+1 … L−1;
  p_restored(l, t) is the mean over draws of P(answer) at the last position. The indirect
  effect is IE(l, t) = p_restored(l, t) − p_corrupted.

Work is shared where the result cannot change. The clean and corrupted states of every
block are kept, so restoring at block l starts from the stored corrupted output of block l
and runs only the blocks after it, all restored positions of one block together. In the
packed layout (where the architecture takes a prepared 4-D mask) each noise draw is one row
holding its corrupted sequence and, for every restored position t, a segment with positions
t … T−1 that attends to the corrupted positions before t and to itself: the positions before
t, which a restoration at t cannot change, are not recomputed per restoration. The padded
layout runs every (restoration, draw) as a full row. Restoring the last block's output needs
no block: at the last position it is the clean output (p_clean), elsewhere the read-out does
not see it (p_corrupted). Positions before the first subject token are identical in the clean
and the corrupted runs (causal attention), so restoring them changes nothing: their IE is 0
without a run (the tests check this against runs).

Position kinds, as ROME aggregates over prompts: the first subject token, the middle subject
tokens, the last subject token, the first token after the subject, further tokens, the last
token (:func:`position_kinds`).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from layerscope import LayerscopeError
from layerscope.model.adapter import BlockInputs, ModelAdapter

log = logging.getLogger(__name__)

POSITION_KINDS = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
KIND_LABELS = {
    "first_subject": "first subject token",
    "middle_subject": "middle subject tokens",
    "last_subject": "last subject token",
    "first_subsequent": "first subsequent token",
    "further": "further tokens",
    "last": "last token",
}
LAYOUTS = ("auto", "packed", "padded")


# ---------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class FactPrompt:
    """A factual-recall prompt ready to trace: its tokens, subject span and answer token."""

    prompt_id: str
    category: str
    text: str
    subject: str
    answer: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    start: int  # first subject token
    end: int  # one past the last subject token
    answer_id: int
    answer_token: str

    @property
    def length(self) -> int:
        return len(self.ids)

    def kinds(self) -> dict[str, list[int]]:
        return position_kinds(self.length, self.start, self.end)


def position_kinds(length: int, start: int, end: int) -> dict[str, list[int]]:
    """The positions of each kind for a prompt of ``length`` tokens with subject tokens start … end−1.

    A one-token subject is both the first and the last subject token (as ROME counts it); the
    middle subject tokens are those strictly between; the first subsequent token is the one
    right after the subject unless it is the last token, which is its own kind; further
    tokens lie strictly between the first subsequent and the last token. A kind may be empty.
    """
    if not 0 <= start < end <= length:
        raise LayerscopeError(f"subject span [{start}, {end}) outside a prompt of {length} tokens")
    last = length - 1
    after = list(range(end, last))
    return {
        "first_subject": [start],
        "middle_subject": list(range(start + 1, end - 1)),
        "last_subject": [end - 1],
        "first_subsequent": after[:1],
        "further": after[1:],
        "last": [last],
    }


def kind_of_positions(length: int, start: int, end: int) -> list[str]:
    """Per position, its kind(s) joined by '+' ('before_subject' before the subject)."""
    labels = [[] for _ in range(length)]
    for kind, positions in position_kinds(length, start, end).items():
        for t in positions:
            labels[t].append(kind)
    return ["+".join(k) if k else "before_subject" for k in labels]


def _trailing_specials(tokenizer, ids: list[int], offsets: list[tuple[int, int]] | None) -> int:
    """How many special tokens the tokenizer appended (an end-of-sequence token some add)."""
    special = set(tokenizer.all_special_ids)
    n = 0
    while n < len(ids) - 1 and ids[-1 - n] in special and (offsets is None or offsets[-1 - n][1] <= offsets[-1 - n][0]):
        n += 1
    return n


def prepare_prompt(tokenizer, prompt) -> FactPrompt | str:
    """A :class:`FactPrompt` from a prompt with ``subject`` and ``answer``, or the reason it cannot be traced."""
    text, subject, answer = prompt.text, prompt.subject, prompt.answer
    if not subject or answer is None or not str(answer).strip():
        return "no subject and answer annotated"
    answer = str(answer).strip()
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as exc:
        return f"the tokenizer gives no character offsets ({type(exc).__name__}): the subject cannot be located"
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    cut = _trailing_specials(tokenizer, ids, offsets)
    if cut:
        ids, offsets = ids[:-cut], offsets[:-cut]
    begin = text.index(subject)
    stop = begin + len(subject)
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < stop and e > begin]
    if not inside:
        return f"no token covers the subject {subject!r}"
    start, end = inside[0], inside[-1] + 1
    sep = "" if text[-1].isspace() else " "
    full = list(tokenizer(text + sep + answer)["input_ids"])
    cut = _trailing_specials(tokenizer, full, None)
    if cut:
        full = full[:-cut]
    if full[: len(ids)] != ids or len(full) <= len(ids):
        return (f"the answer {answer!r} does not tokenize as a continuation of the text (the tokens of "
                f"{text + sep + answer!r} do not begin with the text's own tokens)")
    answer_id = int(full[len(ids)])
    answer_token = tokenizer.decode([answer_id])
    if not answer_token.strip():
        return (f"the answer's first token {answer_token!r} is whitespace only: its probability does not identify "
                f"the answer {answer!r}")
    return FactPrompt(
        prompt_id=str(prompt.id), category=str(prompt.category), text=text, subject=subject, answer=answer,
        ids=tuple(int(i) for i in ids), tokens=tuple(tokenizer.convert_ids_to_tokens(ids)),
        start=start, end=end, answer_id=answer_id, answer_token=answer_token,
    )


# ---------------------------------------------------------------------------- noise


def _capture(adapter: ModelAdapter, ids: Sequence[int], rows: int, device) -> BlockInputs:
    tensor = torch.tensor([list(ids)], device=device).expand(rows, len(ids))
    return adapter.capture_block_inputs(tensor, torch.ones_like(tensor))


@torch.no_grad()
def noise_std(adapter: ModelAdapter, prompts: Sequence[FactPrompt], device="cpu") -> float:
    """Standard deviation of every ``resid.0`` entry at the subject tokens of ``prompts`` (the noise unit)."""
    values = [_capture(adapter, p.ids, 1, device).resid0[0, p.start:p.end].double().reshape(-1).cpu() for p in prompts]
    if not values:
        raise LayerscopeError("no prompt to measure the embeddings' standard deviation on")
    return float(torch.cat(values).std())


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The noise seed of one prompt: depends on the run's seed and the prompt's id, not on the sample."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(prompt_id.encode())]).generate_state(1)[0])


def draw_noise(prompt: FactPrompt, samples: int, d_model: int, sigma: float, seed: int) -> torch.Tensor:
    """``samples`` seeded Gaussian draws for the subject tokens: [samples, e − b, d_model] (float64)."""
    generator = torch.Generator().manual_seed(prompt_seed(seed, prompt.prompt_id))
    return sigma * torch.randn((samples, prompt.end - prompt.start, d_model), generator=generator,
                               dtype=torch.float64)


# ---------------------------------------------------------------------------- the runs


@dataclass
class PromptTrace:
    prompt: FactPrompt
    p_clean: float
    p_corrupted: float
    p_restored: np.ndarray  # [n_layers, length]: the output of block l restored at position t
    clean_top1: bool  # the answer token is the model's greedy next token

    @property
    def effect(self) -> np.ndarray:
        return self.p_restored - self.p_corrupted

    def kind_effects(self) -> np.ndarray:
        """[n_kinds, n_layers]: the mean indirect effect over the positions of each kind (NaN where none)."""
        effect = self.effect
        out = np.full((len(POSITION_KINDS), effect.shape[0]), np.nan)
        for k, kind in enumerate(POSITION_KINDS):
            positions = self.prompt.kinds()[kind]
            if positions:
                out[k] = effect[:, positions].mean(axis=1)
        return out


class Tracer:
    """The clean and corrupted runs of one prompt, and restored runs from them (see module docstring).

    ``noise`` is [samples, e − b, d_model], added to ``resid.0`` at the subject positions. Sites
    are residual boundaries: ``resid.s`` is the input of block s, so the output of block l is
    site l + 1 (site 0: the embeddings, site L: the last block's output).
    """

    def __init__(self, adapter: ModelAdapter, prompt: FactPrompt, noise: torch.Tensor, *, device="cpu",
                 layout: str = "auto", batch_size: int = 16):
        if layout not in LAYOUTS:
            raise LayerscopeError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if noise.dim() != 3 or noise.shape[1] != prompt.end - prompt.start or noise.shape[2] != adapter.facts.d_model:
            raise LayerscopeError(f"noise of shape {list(noise.shape)} does not fit the subject of {prompt.prompt_id} "
                                  f"({prompt.end - prompt.start} tokens, d_model {adapter.facts.d_model})")
        self.adapter, self.prompt, self.layout = adapter, prompt, layout
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.samples = int(noise.shape[0])
        self._inputs: dict[int, BlockInputs] = {}
        self._packed_inputs: dict[tuple[int, ...], tuple[BlockInputs | None, list[int]]] = {}
        self._packed_problem: str | None = None
        with torch.no_grad():
            clean_in = _capture(adapter, prompt.ids, 1, self.device)
            self.clean = self._run_all(clean_in.resid0, clean_in)
            logits = adapter.readout(self.clean[-1][:, -1]).float()
            self.p_clean = float(torch.softmax(logits, dim=-1)[0, prompt.answer_id])
            self.clean_top1 = int(logits[0].argmax()) == prompt.answer_id
            corrupted_in = self._padded_inputs(self.samples)
            resid0 = corrupted_in.resid0.clone()
            resid0[:, prompt.start:prompt.end] += noise.to(device=self.device, dtype=resid0.dtype)
            self.corrupted = self._run_all(resid0, corrupted_in)
            self.p_corrupted = float(self._probability(self.corrupted[-1][:, -1]).mean())

    # -- helpers ---------------------------------------------------------------------------------
    def _run_all(self, hidden: torch.Tensor, inputs: BlockInputs) -> list[torch.Tensor]:
        states = [hidden]
        for layer in range(self.adapter.n_layers):
            states.append(self.adapter.run_block(layer, states[-1], inputs))
        return states

    def _probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(answer) per row of final-position states [rows, d] (float64)."""
        logits = self.adapter.readout(hidden).float()
        return torch.softmax(logits, dim=-1)[:, self.prompt.answer_id].double()

    def _padded_inputs(self, rows: int) -> BlockInputs:
        if rows not in self._inputs:
            self._inputs[rows] = _capture(self.adapter, self.prompt.ids, rows, self.device)
        return self._inputs[rows]

    def _packed(self, starts: list[int]) -> tuple[BlockInputs | None, list[int]]:
        """Block inputs of the packed rows for segments starting at ``starts`` (None when packing is not
        possible), and the offset of each segment in the row; the same for every site."""
        key = tuple(starts)
        if key not in self._packed_inputs:
            self._packed_inputs[key] = self._capture_packed(starts)
        return self._packed_inputs[key]

    def _capture_packed(self, starts: list[int]) -> tuple[BlockInputs | None, list[int]]:
        from layerscope.engines.surgery import capture_packed

        T = self.prompt.length
        positions = list(range(T))
        segments = [0] * T
        offsets = []
        for k, t in enumerate(starts):
            offsets.append(len(positions))
            positions += list(range(t, T))
            segments += [k + 1] * (T - t)
        width = len(positions)
        problem = self._packed_problem or self.adapter.packing_problem(width)
        if problem is None:
            pos = torch.tensor(positions)
            seg = torch.tensor(segments)
            first = torch.tensor([0] + list(starts))[seg]  # a segment sees the corrupted run before its start
            allowed = (seg[None, :] == seg[:, None]) & (pos[None, :] <= pos[:, None])
            allowed |= (seg[None, :] == 0) & (pos[None, :] < first[:, None])
            if self.adapter.attention_implementation == "eager":
                mask = torch.zeros(allowed.shape, dtype=self.adapter.dtype)
                mask.masked_fill_(~allowed, torch.finfo(self.adapter.dtype).min)
            else:
                mask = allowed
            ids = torch.tensor([[self.prompt.ids[p] for p in positions]]).expand(self.samples, width)
            inputs, problem = capture_packed(self.adapter, ids, mask[None, None], pos[None], self.device)
            if problem is None:
                return inputs, offsets
        if self.layout == "packed":
            raise LayerscopeError(f"causal tracing cannot pack the restored runs: {problem}")
        if self._packed_problem is None:
            log.info("causal tracing in padded rows: %s", problem)
            self._packed_problem = problem
        return None, offsets

    # -- restored runs ---------------------------------------------------------------------------
    @torch.no_grad()
    def restored(self, site: int, restore_sets: Sequence[Sequence[int]]) -> np.ndarray:
        """P(answer) at the last position, mean over draws, with the clean ``resid.site`` restored at the
        positions of each set in the corrupted run: one value per set."""
        L, T, S = self.adapter.n_layers, self.prompt.length, self.samples
        if not 0 <= site <= L:
            raise LayerscopeError(f"site {site} outside 0 … {L}")
        sets = [sorted({int(t) for t in positions}) for positions in restore_sets]
        if any(not s or s[0] < 0 or s[-1] >= T for s in sets):
            raise LayerscopeError(f"restored positions must be non-empty and within 0 … {T - 1}")
        clean, corrupted = self.clean[site][0], self.corrupted[site]
        out = np.empty(len(sets))
        for lo in range(0, len(sets), self.batch_size):
            chunk = sets[lo: lo + self.batch_size]
            n = len(chunk)
            inputs, offsets = (None, []) if self.layout == "padded" else self._packed([s[0] for s in chunk])
            if inputs is not None:
                parts, ends = [corrupted], []
                for positions, offset in zip(chunk, offsets):
                    segment = corrupted[:, positions[0]:].clone()
                    segment[:, [t - positions[0] for t in positions]] = clean[positions]
                    parts.append(segment)
                    ends.append(offset + T - positions[0] - 1)
                state = torch.cat(parts, dim=1)  # [S, width, d]
                hidden = self.adapter.run_blocks(state, range(site, L), inputs)
                p = self._probability(hidden[:, ends].reshape(S * n, -1)).view(S, n).mean(0)
            else:
                state = corrupted.repeat(n, 1, 1)  # rows: (set k, draw s) = k * S + s
                for k, positions in enumerate(chunk):
                    state[k * S:(k + 1) * S, positions] = clean[positions]
                hidden = self.adapter.run_blocks(state, range(site, L), self._padded_inputs(n * S))
                p = self._probability(hidden[:, -1]).view(n, S).mean(1)
            out[lo: lo + n] = p.cpu().numpy()
        return out

    def grid(self, *, all_positions: bool = False) -> np.ndarray:
        """p_restored [L, T]: the output of block l restored at position t.

        Positions before the first subject token get p_corrupted without a run unless
        ``all_positions``; the last block's output needs no run (see module docstring).
        """
        L, T = self.adapter.n_layers, self.prompt.length
        first = 0 if all_positions else self.prompt.start
        positions = list(range(first, T))
        grid = np.full((L, T), self.p_corrupted)
        for layer in range(L - 1):
            grid[layer, positions] = self.restored(layer + 1, [[t] for t in positions])
        grid[L - 1, T - 1] = self.p_clean
        return grid


def trace_prompt(adapter: ModelAdapter, prompt: FactPrompt, noise: torch.Tensor, *, device="cpu",
                 layout: str = "auto", batch_size: int = 16, all_positions: bool = False) -> PromptTrace:
    """The clean, corrupted and restored probabilities of one prompt (see module docstring)."""
    tracer = Tracer(adapter, prompt, noise, device=device, layout=layout, batch_size=batch_size)
    grid = tracer.grid(all_positions=all_positions)
    return PromptTrace(prompt, tracer.p_clean, tracer.p_corrupted, grid, tracer.clean_top1)

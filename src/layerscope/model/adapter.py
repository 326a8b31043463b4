"""One view of a transformer, whatever its family.

Every experiment sees a model through :class:`ModelAdapter`: the token embedding, the list
of blocks, each block's attention and MLP sub-modules and their projection weights
(q, k, v, o, gate, up, down — fused projections split), its norms, the final norm, the
unembedding, the architecture facts, and a block runner that executes any sequence of
blocks from any residual state.

Two further kinds are read for their weights only (``weight_spectra``, ``weight_topology``):
``encoder_decoder`` (T5: an encoder and a decoder *stack*, cross-attention ``cross_q cross_k
cross_v cross_o`` in decoder blocks, a learned relative position bias table per stack) and
``vision`` (ViT encoders: CLIP's vision tower, DINOv2; a patch-embedding convolution, a class
token and learned position embeddings). Their blocks form one flat list, encoder blocks first;
:meth:`ModelAdapter.block_site` names block ``i`` by its stack and index within the stack
(``encoder.3``, ``decoder.3``). Everything that runs the model (block runner, sub-layers,
read-out) refuses them, and :func:`load_model` refuses them unless asked for a weights-only view.

Names of places in the model follow one scheme everywhere (sites):

* ``resid.{i}`` — the residual stream entering block ``i`` (``resid.0`` is what block 0
  actually receives: scaled embeddings for Gemma, token + position embeddings for GPT-2);
* ``resid.{L}`` — the output of the last block, *before* the final norm;
* projection types ``q k v o gate up down`` (plain MLPs have only ``up`` and ``down``).

The block runner records, with one cheap pass, the extra arguments the model hands each
block (attention mask of that block's type, rotary tables, position ids) and then calls
blocks directly, so knockout/swap/shuffle never depend on the model's own layer loop (whose
``layer_idx`` bookkeeping breaks when blocks are reordered; no KV cache is used).

A model dispatched over several devices, CPU memory and disk (see :mod:`layerscope.model.placement`)
is run the same way: the residual stream and the block's extra arguments are moved to each
block's execution device before it runs, and every result (block outputs, read-out logits)
comes back to the adapter's main device (:attr:`ModelAdapter.device`, where the embedding
computes), so callers never see more than one device.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from layerscope import LayerscopeError

PROJECTION_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_TYPES = ("q", "k", "v", "o")
MLP_TYPES = ("gate", "up", "down")
CROSS_ATTENTION_TYPES = ("cross_q", "cross_k", "cross_v", "cross_o")  # T5 decoder blocks: queries from the
# decoder stream, keys and values from the encoder output

KINDS = ("decoder", "encoder", "encoder_decoder", "vision")
WEIGHTS_ONLY_KINDS = ("encoder_decoder", "vision")  # read for their weights only: no prompts, no forward passes


class UnsupportedArchitecture(LayerscopeError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class ProjectionRef:
    """Where a projection's weight lives: a parameter, possibly a row block of a fused one.

    ``rows`` selects output rows of the parameter as an nn.Linear stores it ([out, in]);
    ``transposed`` marks GPT-2's Conv1D, which stores [in, out].
    """

    type: str
    param: str  # parameter name relative to the model root
    rows: tuple[int, ...] | slice | None = None
    transposed: bool = False
    bias: str | None = None


def oriented(weight: torch.Tensor, ref) -> torch.Tensor:
    """A parameter as a 2-D [out, in] matrix; a view, writes go through.

    GPT-2's Conv1D stores [in, out] (``transposed``). Parameters that are not 2-D are reshaped:
    a 4-D convolution kernel [out, in, kh, kw] (a ViT's patch embedding) to [out, in·kh·kw]
    (flattened in (in, kh, kw) order: row o applied to a flattened patch is output channel o);
    a 3-D [1, n, d] table (DINOv2's position embeddings, class token) to [n, d]; a 1-D vector
    (CLIP's class embedding) to one row [1, d].
    """
    if weight.ndim == 4:
        weight = weight.reshape(weight.shape[0], -1)
    elif weight.ndim == 3:
        weight = weight.reshape(-1, weight.shape[-1])
    elif weight.ndim == 1:
        weight = weight.unsqueeze(0)
    return weight.T if ref.transposed else weight


def projection_matrix(weight: torch.Tensor, ref) -> torch.Tensor:
    """The [out, in] matrix that ``ref`` (anything with ``rows`` and ``transposed``) selects from its parameter.

    A view of the parameter unless ``rows`` is an index tuple (then a copy).
    """
    w = oriented(weight, ref)
    if isinstance(ref.rows, slice):
        return w[ref.rows]
    if ref.rows is not None:
        return w[list(ref.rows)]
    return w


@dataclass(frozen=True)
class ArchFacts:
    family: str
    model_type: str
    kind: str  # decoder | encoder | encoder_decoder | vision
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    norm_type: str  # rmsnorm | layernorm
    norm_position: str  # pre | post | sandwich
    mlp_type: str  # gated | plain
    position: str  # rotary | learned | relative (T5's bucketed bias)
    tied_embeddings: bool
    parallel_residual: bool = False
    final_logit_softcap: float | None = None
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    stacks: dict | None = None  # blocks per stack of a multi-stack model ({"encoder": 6, "decoder": 6})
    patch_size: int | None = None  # vision: side of a square patch, in pixels
    image_size: int | None = None  # vision: the image side the position table was trained for
    num_channels: int | None = None  # vision: input channels of the patch embedding
    not_read: str | None = None  # parts of the checkpoint the view leaves out (a full CLIP's text tower)

    @property
    def gqa_group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts. Paths are dotted module names."""

    name: str
    model_types: tuple[str, ...]
    base: str  # the backbone module below the task model ("" for the model itself)
    blocks: str  # relative to base
    embed: str  # relative to base
    final_norm: str | None  # relative to base
    attn: str  # relative to a block
    mlp: str | None  # relative to a block
    norms: dict[str, str]  # role -> path relative to a block
    norm_type: str
    norm_position: str
    mlp_type: str
    position: str
    kind: str = "decoder"
    extra_embeddings: tuple[str, ...] = ()  # position / token-type embeddings, relative to base
    norm_weight_offset: float = 0.0
    embed_norm: str | None = None  # a norm applied to the embeddings before block 0 (BERT), relative to base
    # several block stacks ((stack name, blocks path relative to base), ...); empty: one unnamed stack at `blocks`
    stacks: tuple[tuple[str, str], ...] = ()
    embed_type: str = "embed"  # the inventory type of `embed` (a ViT's patch embedding: patch_embed)

    def projection_refs(self, config, prefix: str) -> list[ProjectionRef]:  # pragma: no cover - per family
        raise NotImplementedError

    def block_norm_paths(self, stack: str) -> dict[str, str]:
        """Norms (and DINOv2's layer scales) of a block of ``stack`` by role, relative to the block."""
        return self.norms

    def final_norms(self) -> list[tuple[str, str]]:
        """(role, path relative to base) of the norms after the last block of each stack."""
        return [("final", self.final_norm)] if self.final_norm else []

    def auto_class(self, model_type: str):
        """The transformers class that loads a checkpoint of this family (with its unembedding, if any)."""
        import transformers

        return {"decoder": transformers.AutoModelForCausalLM, "encoder_decoder": transformers.AutoModelForSeq2SeqLM}.get(
            self.kind, transformers.AutoModel)


def _llama_like_refs(config, prefix: str, *, fused_qkv: bool = False, fused_gate_up: bool = False) -> list[ProjectionRef]:
    attn = f"{prefix}.self_attn"
    mlp = f"{prefix}.mlp"
    refs: list[ProjectionRef] = []
    if fused_qkv:
        n_q = config.num_attention_heads * _head_dim(config)
        n_kv = _n_kv_heads(config) * _head_dim(config)
        fused = f"{attn}.qkv_proj.weight"
        refs += [
            ProjectionRef("q", fused, slice(0, n_q)),
            ProjectionRef("k", fused, slice(n_q, n_q + n_kv)),
            ProjectionRef("v", fused, slice(n_q + n_kv, n_q + 2 * n_kv)),
        ]
    else:
        for t in ("q", "k", "v"):
            refs.append(ProjectionRef(t, f"{attn}.{t}_proj.weight", bias=f"{attn}.{t}_proj.bias"))
    refs.append(ProjectionRef("o", f"{attn}.o_proj.weight", bias=f"{attn}.o_proj.bias"))
    if fused_gate_up:
        d_ff = config.intermediate_size
        fused = f"{mlp}.gate_up_proj.weight"
        refs += [ProjectionRef("gate", fused, slice(0, d_ff)), ProjectionRef("up", fused, slice(d_ff, 2 * d_ff))]
    else:
        refs += [ProjectionRef("gate", f"{mlp}.gate_proj.weight"), ProjectionRef("up", f"{mlp}.up_proj.weight")]
    refs.append(ProjectionRef("down", f"{mlp}.down_proj.weight"))
    return refs


class _LlamaLike(Family):
    def projection_refs(self, config, prefix):
        return _llama_like_refs(config, prefix)


class _Phi3(Family):
    def projection_refs(self, config, prefix):
        return _llama_like_refs(config, prefix, fused_qkv=True, fused_gate_up=True)


class _GPT2(Family):
    def projection_refs(self, config, prefix):
        d = config.hidden_size
        fused = f"{prefix}.attn.c_attn.weight"  # Conv1D [in, 3d]: columns q | k | v
        return [
            ProjectionRef("q", fused, slice(0, d), transposed=True),
            ProjectionRef("k", fused, slice(d, 2 * d), transposed=True),
            ProjectionRef("v", fused, slice(2 * d, 3 * d), transposed=True),
            ProjectionRef("o", f"{prefix}.attn.c_proj.weight", transposed=True),
            ProjectionRef("up", f"{prefix}.mlp.c_fc.weight", transposed=True),
            ProjectionRef("down", f"{prefix}.mlp.c_proj.weight", transposed=True),
        ]


class _GPTNeoX(Family):
    def projection_refs(self, config, prefix):
        # query_key_value rows are interleaved per head: [h0: q k v][h1: q k v]...
        n_heads = config.num_attention_heads
        hs = config.hidden_size // n_heads
        fused = f"{prefix}.attention.query_key_value.weight"

        def rows(part: int) -> tuple[int, ...]:
            return tuple(r for h in range(n_heads) for r in range(h * 3 * hs + part * hs, h * 3 * hs + (part + 1) * hs))

        return [
            ProjectionRef("q", fused, rows(0)),
            ProjectionRef("k", fused, rows(1)),
            ProjectionRef("v", fused, rows(2)),
            ProjectionRef("o", f"{prefix}.attention.dense.weight"),
            ProjectionRef("up", f"{prefix}.mlp.dense_h_to_4h.weight"),
            ProjectionRef("down", f"{prefix}.mlp.dense_4h_to_h.weight"),
        ]


class _Bert(Family):
    def projection_refs(self, config, prefix):
        a = f"{prefix}.attention"
        return [
            ProjectionRef("q", f"{a}.self.query.weight"),
            ProjectionRef("k", f"{a}.self.key.weight"),
            ProjectionRef("v", f"{a}.self.value.weight"),
            ProjectionRef("o", f"{a}.output.dense.weight"),
            ProjectionRef("up", f"{prefix}.intermediate.dense.weight"),
            ProjectionRef("down", f"{prefix}.output.dense.weight"),
        ]


class _T5(Family):
    """T5 (and T5 v1.1's gated-GELU MLP): two stacks; decoder blocks add cross-attention."""

    def projection_refs(self, config, prefix):
        decoder = prefix.split(".")[0] == "decoder"
        sa = f"{prefix}.layer.0.SelfAttention"
        refs = [ProjectionRef(t, f"{sa}.{t}.weight") for t in ATTENTION_TYPES]
        if decoder:
            ca = f"{prefix}.layer.1.EncDecAttention"
            refs += [ProjectionRef(f"cross_{t}", f"{ca}.{t}.weight") for t in ATTENTION_TYPES]
        ff = f"{prefix}.layer.{2 if decoder else 1}.DenseReluDense"
        if getattr(config, "is_gated_act", False):  # act(wi_0 x) ⊙ (wi_1 x)
            refs += [ProjectionRef("gate", f"{ff}.wi_0.weight"), ProjectionRef("up", f"{ff}.wi_1.weight")]
        else:
            refs.append(ProjectionRef("up", f"{ff}.wi.weight"))
        refs.append(ProjectionRef("down", f"{ff}.wo.weight"))
        return refs

    def block_norm_paths(self, stack):
        if stack == "decoder":
            return {"attn": "layer.0.layer_norm", "cross_attn": "layer.1.layer_norm", "mlp": "layer.2.layer_norm"}
        return {"attn": "layer.0.layer_norm", "mlp": "layer.1.layer_norm"}

    def final_norms(self):
        return [(f"{stack}.final", f"{stack}.final_layer_norm") for stack, _ in self.stacks]


class _CLIPVision(Family):
    def projection_refs(self, config, prefix):
        a = f"{prefix}.self_attn"
        return [
            *(ProjectionRef(t, f"{a}.{t}_proj.weight", bias=f"{a}.{t}_proj.bias") for t in ("q", "k", "v")),
            ProjectionRef("o", f"{a}.out_proj.weight", bias=f"{a}.out_proj.bias"),
            ProjectionRef("up", f"{prefix}.mlp.fc1.weight", bias=f"{prefix}.mlp.fc1.bias"),
            ProjectionRef("down", f"{prefix}.mlp.fc2.weight", bias=f"{prefix}.mlp.fc2.bias"),
        ]

    def auto_class(self, model_type):
        import transformers

        # a full CLIP checkpoint (model_type clip) loads its vision tower alone
        return transformers.CLIPVisionModel


class _Dinov2(Family):
    def projection_refs(self, config, prefix):
        a = f"{prefix}.attention"
        refs = [ProjectionRef(t, f"{a}.{t}_proj.weight", bias=f"{a}.{t}_proj.bias") for t in ATTENTION_TYPES]
        m = f"{prefix}.mlp"
        if getattr(config, "use_swiglu_ffn", False):  # SwiGLU: silu(gate x) ⊙ (up x)
            refs += [ProjectionRef(t, f"{m}.{t}_proj.weight", bias=f"{m}.{t}_proj.bias") for t in MLP_TYPES]
        else:
            refs += [ProjectionRef("up", f"{m}.fc1.weight", bias=f"{m}.fc1.bias"),
                     ProjectionRef("down", f"{m}.fc2.weight", bias=f"{m}.fc2.bias")]
        return refs


_PRE_NORMS = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}

FAMILIES: tuple[Family, ...] = (
    _LlamaLike(
        "llama", ("llama", "mistral", "qwen2", "qwen3"), "model", "layers", "embed_tokens", "norm",
        "self_attn", "mlp", _PRE_NORMS, "rmsnorm", "pre", "gated", "rotary",
    ),
    _LlamaLike(
        "gemma", ("gemma",), "model", "layers", "embed_tokens", "norm",
        "self_attn", "mlp", _PRE_NORMS, "rmsnorm", "pre", "gated", "rotary", norm_weight_offset=1.0,
    ),
    _LlamaLike(
        "gemma2", ("gemma2",), "model", "layers", "embed_tokens", "norm", "self_attn", "mlp",
        {
            "attn": "input_layernorm", "attn_out": "post_attention_layernorm",
            "mlp": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm",
        },
        "rmsnorm", "sandwich", "gated", "rotary", norm_weight_offset=1.0,
    ),
    _Phi3(
        "phi3", ("phi3",), "model", "layers", "embed_tokens", "norm",
        "self_attn", "mlp", _PRE_NORMS, "rmsnorm", "pre", "gated", "rotary",
    ),
    _GPT2(
        "gpt2", ("gpt2",), "transformer", "h", "wte", "ln_f", "attn", "mlp",
        {"attn": "ln_1", "mlp": "ln_2"}, "layernorm", "pre", "plain", "learned", extra_embeddings=("wpe",),
    ),
    _GPTNeoX(
        "gpt_neox", ("gpt_neox",), "gpt_neox", "layers", "embed_in", "final_layer_norm", "attention", "mlp",
        _PRE_NORMS, "layernorm", "pre", "plain", "rotary",
    ),
    _Bert(
        "bert", ("bert",), "", "encoder.layer", "embeddings.word_embeddings", None, "attention", None,
        {"embed": "", "attn_out": "attention.output.LayerNorm", "mlp_out": "output.LayerNorm"},
        "layernorm", "post", "plain", "learned", kind="encoder",
        extra_embeddings=("embeddings.position_embeddings", "embeddings.token_type_embeddings"),
        embed_norm="embeddings.LayerNorm",
    ),
    # weights-only kinds. mlp_type "auto": gated when the block has a gate projection (T5 v1.1, DINOv2 SwiGLU)
    _T5(
        "t5", ("t5",), "", "encoder.block", "shared", None, "layer.0.SelfAttention", None, {},
        "rmsnorm", "pre", "auto", "relative", kind="encoder_decoder",
        extra_embeddings=("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                          "decoder.block.0.layer.0.SelfAttention.relative_attention_bias"),
        stacks=(("encoder", "encoder.block"), ("decoder", "decoder.block")),
    ),
    _CLIPVision(
        "clip_vision", ("clip_vision_model", "clip"), "", "encoder.layers", "embeddings.patch_embedding",
        "post_layernorm", "self_attn", "mlp", {"attn": "layer_norm1", "mlp": "layer_norm2"},
        "layernorm", "pre", "plain", "learned", kind="vision",
        extra_embeddings=("embeddings.class_embedding", "embeddings.position_embedding"),
        embed_norm="pre_layrnorm", embed_type="patch_embed",
    ),
    _Dinov2(
        "dinov2", ("dinov2",), "", "encoder.layer", "embeddings.patch_embeddings.projection", "layernorm",
        "attention", "mlp",
        {"attn": "norm1", "mlp": "norm2", "attn_layer_scale": "layer_scale1", "mlp_layer_scale": "layer_scale2"},
        "layernorm", "pre", "auto", "learned", kind="vision",
        extra_embeddings=("embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings"),
        embed_type="patch_embed",
    ),
)

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str, architectures: Sequence[str] | None = None) -> Family:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        arch = f" (architectures {list(architectures)})" if architectures else ""
        raise UnsupportedArchitecture(
            f"model_type {model_type!r}{arch} is not supported by layerscope's adapter; "
            f"supported model types: {', '.join(supported_model_types())}"
        ) from None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _n_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def qualify(stack: str, name: str) -> str:
    """``{stack}.{name}`` for a named stack (T5's encoder / decoder), ``name`` for a single-stack model."""
    return f"{stack}.{name}" if stack else name


def extra_embedding_type(path: str) -> str:
    """The inventory type of a model-level table by its parameter path."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "wpe" or "position" in leaf:
        return "position_embed"
    if "token_type" in leaf:
        return "token_type_embed"
    if leaf == "relative_attention_bias":
        return "relative_bias"
    if leaf in ("class_embedding", "cls_token"):
        return "class_token"
    if leaf == "mask_token":
        return "mask_token"
    return "other"


def weights_only_message(model: str, kind: str, what: str) -> str:
    article = "an" if kind[0] in "aeiou" else "a"
    return (f"{model} is {article} {kind} model: layerscope reads only its weights (weight_spectra, weight_topology); "
            f"{what} needs a decoder or encoder text model. Leave this model out of the experiment's `models:` "
            "list (or list only decoder/encoder models there).")


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """What the model hands every block for one batch, besides the residual stream."""

    resid0: torch.Tensor
    args: list[tuple] = field(default_factory=list)  # positional args after hidden_states, per block
    kwargs: list[dict] = field(default_factory=list)  # keyword args, per block
    moved: dict = field(default_factory=dict, repr=False)  # (block, device) -> its args and kwargs on that device


@dataclass
class SubLayers:
    """The attention and MLP sub-layers of one block, as functions of the residual stream.

    Each maps a residual state ``[batch, seq, d_model]`` to a residual state, skip
    connection (and, where the family has them, its norms) included:

    * pre-norm (Llama-like, Phi-3, Gemma, GPT-2, GPT-NeoX): ``attn(h) = h + Attn(norm₁(h))``,
      ``mlp(h) = h + MLP(norm₂(h))``;
    * Gemma 2 sandwich norms: ``attn(h) = h + norm_out(Attn(norm₁(h)))``, likewise the MLP;
    * BERT post-norm: ``attn(h) = LN(h + Attn(h))``, ``mlp(h) = LN(h + MLP(h))``;
    * GPT-NeoX parallel residual (``parallel``): both read the block input,
      block(h) = h + Attn(norm₁(h)) + MLP(norm₂(h)) = attn(h) + mlp(h) − h.

    :meth:`block` composes them and equals the block's own forward; :meth:`mlp_input` is
    the state the MLP sub-layer reads (the attention sub-layer's output, or the block
    input for a parallel residual). The callables close over the block's extra arguments
    (masks, rotary tables) captured for one batch, so they accept that batch's shape.
    """

    attn: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    parallel: bool = False

    def mlp_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.parallel else self.attn(hidden)

    def block(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            return self.attn(hidden) + self.mlp(hidden) - hidden
        return self.mlp(self.attn(hidden))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class ModelAdapter:
    """The standard view of a loaded Hugging Face model (see module docstring)."""

    def __init__(self, model: nn.Module, checkpoint_model_type: str | None = None):
        """``checkpoint_model_type``: the model_type of the folder the model was loaded from, when it differs
        (a full CLIP checkpoint loaded as its vision tower)."""
        self.model = model
        config = model.config
        self.config = config
        self.family = family_for(config.model_type, getattr(config, "architectures", None))
        base = model.get_submodule(self.family.base) if self.family.base else model
        if self.family.kind == "decoder" and self.family.base and not hasattr(model, self.family.base):
            raise UnsupportedArchitecture(
                f"{type(model).__name__} has no '{self.family.base}' backbone; load decoders with AutoModelForCausalLM"
            )
        self.base = base
        self._base_prefix = f"{self.family.base}." if self.family.base else ""
        self.weights_only = self.family.kind in WEIGHTS_ONLY_KINDS
        # (stack, index within the stack, block path relative to base) of every block, in flat order
        stacks = self.family.stacks or (("", self.family.blocks),)
        self._sites: list[tuple[str, int, str]] = []
        stack_sizes: dict[str, int] = {}
        for stack, path in stacks:
            n = len(base.get_submodule(path))
            stack_sizes[stack] = n
            self._sites += [(stack, j, f"{path}.{j}") for j in range(n)]
        if self.family.stacks:
            self.blocks = nn.ModuleList([base.get_submodule(path) for _, _, path in self._sites])
        else:
            self.blocks: nn.ModuleList = base.get_submodule(self.family.blocks)
        self.embed: nn.Module = base.get_submodule(self.family.embed)
        self.final_norm: nn.Module | None = base.get_submodule(self.family.final_norm) if self.family.final_norm else None
        self.embed_norm: nn.Module | None = base.get_submodule(self.family.embed_norm) if self.family.embed_norm else None
        self.unembed: nn.Module | None = (
            model.get_output_embeddings() if self.family.kind in ("decoder", "encoder_decoder") else None)
        n_layers = len(self.blocks)
        expected = {"encoder": getattr(config, "num_layers", None),
                    "decoder": getattr(config, "num_decoder_layers", None)} if self.family.stacks else {
            "": config.num_hidden_layers}
        for stack, n in stack_sizes.items():
            if expected.get(stack) is not None and n != expected[stack]:
                raise UnsupportedArchitecture(
                    f"{config.model_type}: found {n} blocks{f' in the {stack}' if stack else ''} but config says "
                    f"{expected[stack]}"
                )
        tied = bool(self.unembed is not None and self.unembed.weight is self.embed.weight)
        if self.weights_only:
            # shapes from the weights themselves (T5's d_kv, DINOv2's SwiGLU width are not hidden / heads, 4 × d)
            first = {ref.type: ref for ref in self.projection_refs(0)}
            params = dict(model.named_parameters(remove_duplicate=False))
            d_ff = oriented(params[first["down"].param], first["down"]).shape[1]
            n_heads = config.num_attention_heads
            head_dim = oriented(params[first["q"].param], first["q"]).shape[0] // n_heads
            n_kv_heads = n_heads
            mlp_type = "gated" if "gate" in first else "plain"
        else:
            d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
            n_heads, n_kv_heads, head_dim = config.num_attention_heads, _n_kv_heads(config), _head_dim(config)
            mlp_type = self.family.mlp_type
        vision = self.family.kind == "vision"
        self.facts = ArchFacts(
            family=self.family.name,
            model_type=config.model_type,
            kind=self.family.kind,
            n_layers=n_layers,
            d_model=config.hidden_size,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            d_ff=int(d_ff),
            vocab_size=int(getattr(config, "vocab_size", 0) or 0),
            norm_type=self.family.norm_type,
            norm_position=self.family.norm_position,
            mlp_type=mlp_type,
            position=self.family.position,
            tied_embeddings=tied,
            parallel_residual=bool(getattr(config, "use_parallel_residual", False)),
            final_logit_softcap=getattr(config, "final_logit_softcapping", None),
            norm_weight_offset=self.family.norm_weight_offset,
            stacks=dict(stack_sizes) if self.family.stacks else None,
            patch_size=int(config.patch_size) if vision else None,
            image_size=int(config.image_size) if vision else None,
            num_channels=int(config.num_channels) if vision else None,
            not_read=("the text tower, text_projection, visual_projection and logit_scale of the full CLIP checkpoint"
                      if checkpoint_model_type == "clip" else None),
        )

    # ------------------------------------------------------------------ structure

    @property
    def n_layers(self) -> int:
        return self.facts.n_layers

    @property
    def device(self) -> torch.device:
        """The main device: where the embedding computes (inputs go there, results come back there)."""
        from layerscope.model.placement import execution_device

        return execution_device(self.embed, self.embed.weight.device)

    @property
    def dispatched(self) -> bool:
        """Whether accelerate dispatched the model (blocks on several devices, or offloaded)."""
        return any(hasattr(m, "_hf_hook") for m in self.model.modules())

    @property
    def offloaded(self) -> bool:
        """Whether some weights live off their execution device (CPU or disk offload: meta parameters)."""
        return any(p.device.type == "meta" for p in self.model.parameters())

    def block_device(self, index: int) -> torch.device:
        """Where block ``index`` computes (its accelerate hook's execution device, else its weights' device)."""
        from layerscope.model.placement import execution_device

        return execution_device(self.blocks[index], self.device)

    def parameter(self, name: str) -> torch.Tensor:
        """Parameter ``name`` (relative to the model root), read back from its offload if it has one."""
        from layerscope.model.placement import offloaded_value

        return offloaded_value(self.model, name)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def attention(self, i: int) -> nn.Module:
        return self.blocks[i].get_submodule(self.family.attn)

    def mlp(self, i: int) -> nn.Module | None:
        return self.blocks[i].get_submodule(self.family.mlp) if self.family.mlp else None

    def block_site(self, i: int) -> tuple[str, int]:
        """(stack, index within the stack) of flat block ``i``; the stack is "" for single-stack models."""
        stack, j, _ = self._sites[i]
        return stack, j

    def block_label(self, i: int) -> str:
        """``encoder.3`` / ``decoder.3`` for multi-stack models, ``3`` otherwise."""
        stack, j = self.block_site(i)
        return qualify(stack, str(j))

    def block_norms(self, i: int) -> dict[str, nn.Module]:
        """The block's norm modules by role (attn, mlp, attn_out, mlp_out; T5 decoders: cross_attn; DINOv2:
        attn_layer_scale, mlp_layer_scale — per-dimension scales of the sub-layers' outputs)."""
        paths = self.family.block_norm_paths(self.block_site(i)[0])
        return {role: self.blocks[i].get_submodule(path) for role, path in paths.items() if path}

    def model_norms(self) -> list[tuple[str, nn.Module]]:
        """(role, module) of the norms outside the blocks: ``embed`` before block 0, ``final`` after the last
        (T5: ``encoder.final`` and ``decoder.final``)."""
        out = [("embed", self.embed_norm)] if self.embed_norm is not None else []
        return out + [(role, self.base.get_submodule(path)) for role, path in self.family.final_norms()]

    def norm_scale(self, norm: nn.Module) -> torch.Tensor | None:
        """The effective per-dimension scale γ of a norm (Gemma stores γ − 1; DINOv2's layer scale is its
        ``lambda1``); None for a norm without a scale."""
        weight = getattr(norm, "weight", None)
        if weight is None:
            scale = getattr(norm, "lambda1", None)
            if scale is not None and scale.device.type == "meta":  # offloaded: read back
                from layerscope.model.placement import offloaded_value

                scale = offloaded_value(norm, "lambda1")
            return scale.detach() if scale is not None else None
        if weight.device.type == "meta":  # offloaded: read back
            from layerscope.model.placement import offloaded_value

            weight = offloaded_value(norm, "weight")
        return weight.detach() + self.facts.norm_weight_offset

    def qk_pairs(self, i: int) -> list[tuple[str, str, str]]:
        """(circuit, query type, key type) of block ``i``'s attention: ``self`` (q, k) and, in T5 decoder
        blocks, ``cross`` (cross_q reads the decoder stream, cross_k the encoder output)."""
        types = {ref.type for ref in self.projection_refs(i)}
        out = [("self", "q", "k")]
        if "cross_q" in types:
            out.append(("cross", "cross_q", "cross_k"))
        return out

    def model_matrices(self) -> list[tuple[str, str, str]]:
        """(name, type, parameter) of the model-level matrices the family declares: the token (or patch)
        embedding, then position / token-type / class / mask tokens and relative position biases."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        out = [(self.family.embed_type, self.family.embed_type, self.param_name(self.family.embed) + ".weight")]
        for path in self.family.extra_embeddings:
            full = self.param_name(path)
            param = f"{full}.weight" if f"{full}.weight" in params else full
            if param not in params:
                continue
            kind = extra_embedding_type(path)
            stack = path.split(".")[0] if self.family.stacks else ""
            out.append((qualify(stack, kind), kind, param))
        return out

    def param_name(self, path: str) -> str:
        """Parameter (or module) name relative to the model root of a path relative to the backbone."""
        return f"{self._base_prefix}{path}"

    def block_prefix(self, i: int) -> str:
        return f"{self._base_prefix}{self._sites[i][2]}"

    def projection_refs(self, i: int) -> list[ProjectionRef]:
        return self.family.projection_refs(self.config, self.block_prefix(i))

    def projections(self, i: int) -> dict[str, torch.Tensor]:
        """Projection weights of block i as [out, in] matrices (fused ones split), by type."""
        params = dict(self.model.named_parameters(remove_duplicate=False))

        def value(name: str) -> torch.Tensor:
            p = params[name]
            return (self.parameter(name) if p.device.type == "meta" else p).detach()

        return {ref.type: projection_matrix(value(ref.param), ref) for ref in self.projection_refs(i)}

    def linear_weight_names(self) -> list[str]:
        """Every weight parameter of two or more dimensions (embeddings and convolution kernels included),
        without duplicates of tied weights."""
        return [n for n, p in self.model.named_parameters() if p.ndim >= 2]

    def _needs_forward(self, what: str) -> None:
        if self.weights_only:
            raise LayerscopeError(weights_only_message(self.facts.model_type, self.facts.kind, what))

    # ------------------------------------------------------------------ block runner

    @torch.no_grad()
    def capture_block_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             position_ids: torch.Tensor | None = None) -> BlockInputs:
        """Run the model up to its first block and record what each block would be handed.

        No block is executed: each block's forward is swapped for a recorder that passes the
        residual through unchanged, and the pass stops after the last block. ``attention_mask``
        is the usual 2-D padding mask or a prepared 4-D mask (passed through as-is, with
        explicit ``position_ids``: packed sequences).
        """
        self._needs_forward("the block runner")
        captured = BlockInputs(resid0=torch.empty(0))
        n = self.n_layers
        records: list[tuple[tuple, dict] | None] = [None] * n

        def recorder(index: int):
            def forward(*args, **kwargs):
                if args:
                    hidden, rest = args[0], tuple(args[1:])
                else:
                    hidden, rest = kwargs.pop("hidden_states"), ()
                if index == 0:
                    captured.resid0 = hidden
                records[index] = (rest, kwargs)
                if index == n - 1:
                    raise _StopForward
                return hidden

            return forward

        # a dispatched block's forward is an instance attribute (accelerate's hook): put it back afterwards
        saved = [block.__dict__.get("forward") for block in self.blocks]
        for i, block in enumerate(self.blocks):
            block.forward = recorder(i)
        try:
            extra = {} if position_ids is None else {"position_ids": position_ids.to(self.device)}
            mask = attention_mask.to(self.device) if attention_mask is not None else None
            self.model(input_ids=input_ids.to(self.device), attention_mask=mask, use_cache=False, **extra)
        except _StopForward:
            pass
        finally:
            for block, forward in zip(self.blocks, saved):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward
        if any(r is None for r in records):
            raise UnsupportedArchitecture(f"{self.facts.model_type}: the model's forward did not call every block")
        captured.args = [r[0] for r in records]
        captured.kwargs = [r[1] for r in records]
        return captured

    def _block_args(self, index: int, inputs: BlockInputs, device: torch.device) -> tuple[tuple, dict]:
        """Block ``index``'s extra arguments on ``device`` (moved once per batch and device, then reused)."""
        args, kwargs = inputs.args[index], inputs.kwargs[index]
        if device == self.device:
            return args, kwargs
        key = (index, str(device))
        if key not in inputs.moved:
            from layerscope.model.placement import to_device

            inputs.moved[key] = (to_device(args, device), to_device(kwargs, device))
        return inputs.moved[key]

    def _run_block_here(self, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """Block ``index`` on its own device: the output stays there."""
        device = self.block_device(index)
        args, kwargs = self._block_args(index, inputs, device)
        out = self.blocks[index](hidden.to(device), *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def run_block(self, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """Block ``index`` applied to ``hidden``; the output on the main device."""
        return self._run_block_here(index, hidden, inputs).to(self.device)

    def run_blocks(self, hidden: torch.Tensor, sequence: Iterable[int], inputs: BlockInputs) -> torch.Tensor:
        """Apply blocks in the given order (repeats, skips and permutations allowed); the output on the main device."""
        for index in sequence:
            hidden = self._run_block_here(index, hidden, inputs)
        return hidden.to(self.device)

    def _block_call_kwargs(self, index: int, inputs: BlockInputs) -> dict[str, Any]:
        """The block's extra arguments by name (what it hands its attention module)."""
        block = self.blocks[index]
        bound = inspect.signature(block.forward).bind(None, *inputs.args[index], **inputs.kwargs[index])
        params = list(inspect.signature(block.forward).parameters.values())
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if name == params[0].name:
                continue  # the hidden states
            kind = next(p.kind for p in params if p.name == name)
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                named[name] = value
        # cross-attention inputs are the block's own business (always None for these models)
        for key in ("encoder_hidden_states", "encoder_attention_mask"):
            named.pop(key, None)
        return named

    def sublayers(self, index: int, inputs: BlockInputs) -> SubLayers:
        """Block ``index``'s attention and MLP sub-layers as residual-to-residual functions.

        ``inputs`` is the batch's :class:`BlockInputs` (from :meth:`capture_block_inputs`);
        see :class:`SubLayers` for the definition per family. Dropout modules are not
        called: the adapter's model is in eval mode, where they are the identity.
        """
        self._needs_forward("sub-layer functions")
        block = self.blocks[index]
        device = self.block_device(index)
        named = self._block_call_kwargs(index, inputs)
        if device != self.device:  # a dispatched model: compute where the block lives, answer on the main device
            from layerscope.model.placement import to_device

            named = to_device(named, device)

            def here(f):
                return lambda h: f(h.to(device)).to(self.device)
        else:
            def here(f):
                return f
        if self.family.norm_position == "post":  # BERT: the norms sit inside the sub-layers
            attention = self.attention(index)
            return SubLayers(
                attn=here(lambda h: _first(attention(h, **named))),
                mlp=here(lambda h: block.output(block.intermediate(h), h)),
            )
        norms = self.block_norms(index)
        attention, mlp = self.attention(index), self.mlp(index)
        identity = lambda x: x  # noqa: E731
        attn_out, mlp_out = norms.get("attn_out", identity), norms.get("mlp_out", identity)
        return SubLayers(
            attn=here(lambda h: h + attn_out(_first(attention(norms["attn"](h), **named)))),
            mlp=here(lambda h: h + mlp_out(mlp(norms["mlp"](h)))),
            parallel=bool(getattr(block, "use_parallel_residual", False)),
        )

    def use_attention(self, implementation: str) -> None:
        """Switch the attention kernel (e.g. ``"eager"``: forward-mode AD through attention
        needs it; PyTorch's CPU flash kernel has no jvp). Capture block inputs afterwards."""
        if getattr(self.model.config, "_attn_implementation", None) != implementation:
            self.model.set_attn_implementation(implementation)

    # ------------------------------------------------------------------ architecture-specific execution

    @property
    def attention_implementation(self) -> str | None:
        return getattr(self.config, "_attn_implementation", None)

    def sliding_window_in_use(self, max_length: int) -> bool:
        """Whether some layer attends through a sliding window shorter than ``max_length``."""
        config = self.config
        window = getattr(config, "sliding_window", None)
        if not window or window >= max_length:
            return False
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            return any(t != "full_attention" for t in layer_types)
        return getattr(config, "use_sliding_window", True) is not False

    def packing_problem(self, max_length: int) -> str | None:
        """Why several prompts cannot share one row under a prepared 4-D (tree) mask (None if they can)."""
        impl = self.attention_implementation
        if impl not in ("sdpa", "eager"):
            return f"attention implementation {impl!r} takes no prepared 4-D mask"
        if self.sliding_window_in_use(max_length):
            return f"sliding-window attention (window {self.config.sliding_window} < {max_length} tokens)"
        return None

    @contextlib.contextmanager
    def replaced_blocks(self, sequence: Sequence[int]) -> Iterator[None]:
        """The Hugging Face model with its block list replaced by ``sequence`` (restored on exit).

        Per-layer config entries (``layer_types``) follow their blocks; run it without a KV cache
        (attention layers keep their original ``layer_idx``).
        """
        self._needs_forward("a reordered block list")
        path = self.family.blocks
        container = self.base.get_submodule(path.rpartition(".")[0]) if "." in path else self.base
        name = path.rpartition(".")[2]
        original = getattr(container, name)
        config = self.config
        n_layers = config.num_hidden_layers
        saved_types = list(config.layer_types) if getattr(config, "layer_types", None) else None
        setattr(container, name, torch.nn.ModuleList([original[i] for i in sequence]))
        config.num_hidden_layers = len(sequence)
        if saved_types is not None:
            config.layer_types = [saved_types[i] for i in sequence]
        try:
            yield
        finally:
            setattr(container, name, original)
            config.num_hidden_layers = n_layers
            if saved_types is not None:
                config.layer_types = saved_types

    # ------------------------------------------------------------------ read-out

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the model applies after its last block: final norm, unembedding, logit soft-cap."""
        self._needs_forward("a read-out")
        if self.unembed is None:
            raise LayerscopeError(f"{self.facts.model_type} is an encoder: it has no unembedding to read out")
        from layerscope.model.placement import execution_device

        if self.final_norm is not None:
            hidden = self.final_norm(hidden.to(execution_device(self.final_norm, self.device)))
        logits = self.unembed(hidden.to(execution_device(self.unembed, self.device)))
        cap = self.facts.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.to(self.device)


# ---------------------------------------------------------------------------- loading


def read_model_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise LayerscopeError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    return json.loads(path.read_text())


def check_supported(model_dir: str | Path, kind: str | None = None) -> Family:
    """Fail early, from config.json alone, if the architecture (or the declared kind) does not fit."""
    cfg = read_model_config(model_dir)
    model_type = cfg.get("model_type")
    if not model_type:
        raise UnsupportedArchitecture(f"{model_dir}: config.json has no model_type")
    family = family_for(model_type, cfg.get("architectures"))
    if kind is not None and kind != family.kind:
        article = "an" if family.kind[0] in "aeiou" else "a"
        raise LayerscopeError(
            f"{model_dir}: the model's `kind` setting is '{kind}'"
            + (" (the default when `kind` is left out)" if kind == "decoder" else "")
            + f", but its architecture {model_type} is {article} {family.kind}; set `kind: {family.kind}` for this model "
            "under `models:` in the config"
        )
    return family


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    device = torch.device(device)
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def load_model(
    model_dir: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    kind: str | None = None,
    weights_only: bool = False,
    placement=None,
) -> ModelAdapter:
    """Load a prepared model folder (safetensors only) and wrap it in an adapter.

    Models of a weights-only kind (``encoder_decoder``, ``vision``) load only with
    ``weights_only=True`` (the weight experiments); anything else is refused here, from
    config.json alone, with the model's folder name and kind in the message.

    ``placement`` (a :class:`~layerscope.model.placement.Placement` or its dict; default: the
    one the job installed for this folder, see :func:`~layerscope.model.placement.use_placements`)
    may split the model over devices and offload it to CPU memory or disk through accelerate.
    Without a device map (the default on a CPU) the whole model is loaded onto ``device``.
    """
    from layerscope.model import placement as placing

    cfg = read_model_config(model_dir)
    family = family_for(cfg.get("model_type", "?"), cfg.get("architectures"))
    if family.kind in WEIGHTS_ONLY_KINDS and not weights_only:
        raise LayerscopeError(weights_only_message(f"model '{Path(model_dir).name}' ({cfg.get('model_type')})",
                                                   family.kind, "this experiment"))
    family = check_supported(model_dir, kind)
    torch_dtype = resolve_dtype(dtype, device)
    cls = family.auto_class(cfg.get("model_type"))
    spec = placing.placement_for(model_dir) if placement is None else placing.Placement.of(placement)
    device_map = placing.plan_device_map(model_dir, cls, torch_dtype, spec, device)
    if device_map is None:
        model = cls.from_pretrained(str(model_dir), dtype=torch_dtype, use_safetensors=True)
        model.to(device)
    else:
        model = cls.from_pretrained(str(model_dir), dtype=torch_dtype, use_safetensors=True, device_map=device_map,
                                    offload_folder=placing.offload_dir(spec, device_map))
    model.eval()
    return ModelAdapter(model, checkpoint_model_type=cfg.get("model_type"))


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))

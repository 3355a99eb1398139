"""LoRA layers: a frozen base layer plus a trainable low-rank update, PEFT's conventions.

`LoRALinear` wraps a `lora.nn.Linear` (or a GPT-2 style `Conv1D`, whose weight is stored
(in, out): PEFT's fan_in_fan_out) and computes y = x W^T + b + scaling * (drop(x) A^T) B^T
through the C kernels; `LoRAEmbedding` wraps a `lora.nn.Embedding` the way PEFT does
(y = W[ids] + scaling * A^T[ids] B^T, no dropout). Both keep the base layer's own weight and
bias Parameters (so a base state dict loads into a wrapped model by the same names), hold
`lora_A`/`lora_B` (`lora_embedding_A`/`lora_embedding_B`) Parameters, and merge/unmerge in
place, recording which adapters are merged. A layer holds one or several named adapters
(`Adapter`: a pair with its rank and scaling); the active ones sum, and a mixed batch gives
each row its own (lora.functional.mixed_forward). Choosing which layers to wrap is
lora/tuners/wrap.py's job, managing named adapters on a model lora/tuners/adapters.py's.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np

from .. import functional as F
from ..nn import Conv1D, Embedding, Linear, Module, Parameter, QuantEmbedding, QuantLinear
from ..nn.layers import _check_ids, _Packable, _rows, _scatter_rows, as_input
from .config import MAX_ALPHA, check_positive_int, check_real, scaling_factor
from .variants import VARIANTS, Variant

__all__ = ["LoRAEmbedding", "LoRALinear", "init_lora_weights"]


ADAPTER_NAME = "default"  # the name of a model's first adapter, as PEFT's
BASE_ROWS = "__base__"  # in lora.adapter_names: a row that runs the base layer alone
# per thread, {id(layer): (names, module path, cache)}: the mixed batch lora.adapter_names runs
BATCH_ADAPTERS = threading.local()


@dataclasses.dataclass(eq=False)
class Adapter:
    """One named adapter of one LoRA layer: its pair of matrices, how they are scaled, its
    variant (lora/tuners/variants: plain LoRA, DoRA, ...) and that variant's further
    Parameters by PEFT's field name (DoRA's lora_magnitude_vector)."""

    A: Parameter
    B: Parameter
    r: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    lora_dropout: float = 0.0
    variant: Variant = VARIANTS["lora"]
    extra: dict = dataclasses.field(default_factory=dict)
    merge_state: object = None  # what the variant's merge_into returned, while merged
    options: dict = dataclasses.field(default_factory=dict)  # shared by the adapter's layers
    registered: tuple = ()  # the field names of its Parameters registered on the layer

    def params(self) -> list[Parameter]:
        """Every trainable Parameter of the adapter: A, B and the variant's (VeRA: only its
        vectors; its A and B are frozen slices of the model's shared projections; Tied-LoRA:
        the parts its config trains, A and B shared with the adapter's other layers)."""
        return self.variant.trainable(self)


def check_adapter_name(name, where: str) -> None:
    """ValueError unless `name` can name an adapter: a non-empty string without dots or
    slashes (it becomes a parameter name's last part and a subdirectory of a save), and not
    BASE_ROWS."""
    if not isinstance(name, str) or not name or set(name) & set("./\\\0") or name == BASE_ROWS:
        raise ValueError(f"{where}: an adapter name must be a non-empty string without '.', "
                         f"'/' or '\\\\', and not {BASE_ROWS!r}; got {name!r}")


def check_adapter_args(where: str, name, r, lora_alpha, lora_dropout) -> None:
    """ValueError naming the argument unless the name, r, lora_alpha and lora_dropout can
    make an adapter."""
    check_adapter_name(name, where)
    check_positive_int(r, "r", where)
    check_real(lora_alpha, "lora_alpha", where, MAX_ALPHA)
    check_real(lora_dropout, "lora_dropout", where)
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be in [0, 1), got {lora_dropout}")


def _pair_property(i: int, what: str) -> property:
    return property(lambda self: self._pair()[i],
                    doc=f"The {what} Parameter of the active adapter (the first of several).")


def _adapter_property(field: str) -> property:
    def get(self):
        return getattr(self._current(), field)

    def set_(self, value):
        setattr(self._current(), field, value)

    return property(get, set_, doc=f"{field} of the active adapter (the first of several).")


class _LoRABase(Module):
    """What LoRALinear and LoRAEmbedding share: the base layer, the named adapters (each a
    pair of Parameters with its rank and scaling), which are active and which merged, the
    disabled flag and a mixed batch's per-row adapters.

    The first adapter's Parameters keep the single-adapter names (lora_A, lora_B) when it is
    named "default"; any other adapter's are registered as lora_A.<name> and lora_B.<name>,
    PEFT's path for them. `lora_A`, `r`, `scaling`, ... read the active adapter (the first
    of several active ones)."""

    _PAIR = ("lora_A", "lora_B")

    def _setup(self, base: Module, rng) -> None:
        object.__setattr__(self, "_base", base)  # not a child: its Parameters are ours
        object.__setattr__(self, "_adapters", {})
        self.weight = base.weight
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False  # set by lora.disable_adapters: run the base layer only
        self.rng = rng if rng is not None else np.random.default_rng()
        self.weight.requires_grad = False

    def _new_adapter(self, name: str, r: int, lora_alpha: float, use_rslora: bool,
                     lora_dropout: float, dtype, variant: str = "lora",
                     variant_options: dict | None = None) -> Adapter:
        where = type(self).__name__
        check_adapter_args(where, name, r, lora_alpha, lora_dropout)
        if name in self._adapters:
            raise ValueError(f"{where}: the layer already has an adapter named {name!r}")
        if variant not in VARIANTS:
            raise ValueError(f"{where}: unknown LoRA variant {variant!r}; one of {list(VARIANTS)}")
        v = VARIANTS[variant]
        if self._KIND not in v.kinds:
            raise ValueError(f"{where}: the {v.name} variant does not adapt {self._KIND} layers "
                             f"(it adapts {', '.join(v.kinds)} layers)")
        d_out, d_in = self._dims
        options = dict(variant_options or {})
        shared = v.pair(options, d_out, d_in)
        if shared is None:
            A, B = Parameter(np.zeros((r, d_in), dtype)), Parameter(np.zeros((d_out, r), dtype))
            names = self._PAIR
        elif isinstance(shared[0], Parameter):  # one pair of Parameters for the adapter's layers
            (A, B), names = shared, v.pair_names
        else:  # frozen views of arrays the adapter's layers share
            A, B = Parameter(np.zeros(0, dtype), False), Parameter(np.zeros(0, dtype), False)
            A.data, B.data = shared
            names = None
        ad = Adapter(A, B, r, lora_alpha, use_rslora, scaling_factor(lora_alpha, r, use_rslora),
                     lora_dropout, v, options=options)
        for field, shape in v.extra_shapes(self._KIND, d_out, d_in, r).items():
            ad.extra[field] = Parameter(np.zeros(shape, dtype))
        fields = (dict(zip(names, (A, B), strict=True)) if names else {}) | ad.extra
        ad.registered = tuple(fields)
        for field, p in fields.items():
            self._parameters[self.param_name(field, name)] = p
        first = not self._adapters
        self._adapters[name] = ad
        if first:
            self.active_adapters = [name]
        else:
            for p in ad.params():
                p.requires_grad = False
        return ad

    def _init_adapter(self, name: str, init, loftq_config=None) -> None:
        """init_lora_weights (of an adapter with its own A and B), then the variant's own
        parameters; the adapter is removed again if either fails."""
        try:
            ad = self._adapters[name]
            if self._PAIR[0] in ad.registered:  # its own A and B (not a variant's shared ones)
                _init_weights(self, init, loftq_config, adapter_name=name)
            ad.variant.init(self, ad)
        except BaseException:
            self.delete_adapter(name)
            raise

    def dora_norm(self, ad: Adapter) -> np.ndarray:
        """||W + scaling B A|| per output (lora.functional.dora_norm) for adapter `ad`, read
        from the base weight as it is held: an array in its own layout, or quantized blocks
        (whose squared row norms are computed once and kept)."""
        A, B, s = ad.A.data, ad.B.data, ad.scaling
        base = self._base
        if isinstance(base, QuantLinear):
            kept = getattr(base, "_row_sqnorm", None)
            if kept is None or kept[0] is not base.weight.data:  # blocks replaced: again
                w = base.dequantize()
                kept = (base.weight.data, np.einsum("ij,ij->i", w, w))
                object.__setattr__(base, "_row_sqnorm", kept)
            return F.dora_norm(base.qweight.kernel_weight(), A, B, s, weight_sqnorm=kept[1])
        W = base.dequantize() if isinstance(base, QuantEmbedding) else self.weight_2d()
        return F.dora_norm(W, A, B, s, fan_in_fan_out=self._transposed)

    def weight_2d(self) -> np.ndarray:
        return self.weight.data

    def _merge_one(self, weight: np.ndarray, ad: Adapter) -> object:
        """Add adapter ad's update to `weight` (this layer's layout) in place, by its variant."""
        extra = {k: p.data for k, p in ad.extra.items()}
        weight = weight.reshape(weight.shape[0], -1)  # a conv's kernel flattened: a view
        return ad.variant.merge_into(weight, ad.A.data, ad.B.data, ad.scaling, extra,
                                     self._transposed)

    def _unmerge_one(self, weight: np.ndarray, ad: Adapter) -> None:
        extra = {k: p.data for k, p in ad.extra.items()}
        weight = weight.reshape(weight.shape[0], -1)
        ad.variant.unmerge_from(weight, ad.A.data, ad.B.data, ad.scaling, extra,
                                self._transposed, ad.merge_state)
        ad.merge_state = None

    def _check_mixed(self, ads: list[Adapter]) -> None:
        odd = sorted({ad.variant.name for ad in ads if not ad.variant.stacks})
        if odd:
            raise ValueError(f"{type(self).__name__}: mixed-adapter batches (lora.adapter_names) "
                             f"do not take {'/'.join(odd)} adapters (nor does PEFT); run their "
                             "rows as a batch of their own")

    def _check_alone(self, ads: list[Adapter], what: str) -> None:
        """ValueError when several adapters would run together and one's variant cannot."""
        if len(ads) > 1 and any(not ad.variant.stacks for ad in ads):
            kinds = sorted({ad.variant.name for ad in ads if not ad.variant.stacks})
            raise ValueError(f"{type(self).__name__}: {what} with a {'/'.join(kinds)} adapter "
                             "among them; it runs alone (set_adapter to one adapter)")

    @property
    def _batch_adapters(self):
        """(names, path, cache) while this thread runs a mixed batch (lora.adapter_names);
        None otherwise. Kept per thread, so threads serving different mixed batches with
        one model do not see each other's."""
        return getattr(BATCH_ADAPTERS, "by_layer", {}).get(id(self))

    @staticmethod
    def param_name(field: str, adapter: str) -> str:
        """The name a pair's Parameter is registered under: `field` for "default",
        `field.<adapter>` otherwise."""
        return field if adapter == ADAPTER_NAME else f"{field}.{adapter}"

    @property
    def adapters(self) -> dict[str, Adapter]:
        """The layer's adapters by name, in the order they were added (read only)."""
        return dict(self._adapters)

    def adapter(self, name: str) -> Adapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise KeyError(f"{type(self).__name__}: no adapter named {name!r}; it has "
                           f"{list(self._adapters)}") from None

    def _current(self) -> Adapter:
        names = self.active_adapters or list(self._adapters)
        return self._adapters[names[0]]

    def _pair(self, name: str | None = None) -> tuple[Parameter, Parameter]:
        ad = self._current() if name is None else self.adapter(name)
        return ad.A, ad.B

    r = _adapter_property("r")
    lora_alpha = _adapter_property("lora_alpha")
    use_rslora = _adapter_property("use_rslora")
    scaling = _adapter_property("scaling")
    lora_dropout = _adapter_property("lora_dropout")

    @property
    def merged(self) -> bool:
        """Some adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def set_adapter(self, names: str | list[str]) -> None:
        """Make the layer's adapters among `names` active (they sum) and trainable, and the
        others inactive and frozen, as PEFT's set_adapter. Names the layer does not have are
        skipped (an adapter need not cover every layer)."""
        names = [names] if isinstance(names, str) else list(names)
        self.active_adapters = [n for n in names if n in self._adapters]
        for name, ad in self._adapters.items():
            for p in ad.params():
                p.requires_grad = name in self.active_adapters

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (unmerged first if merged) from the layer."""
        ad = self.adapter(name)
        if name in self.merged_adapters:
            if self.merged_adapters[-1] != name:
                self.unmerge()  # merges are undone last first
            else:
                self._unmerge_one(self.weight.data, ad)
                self.merged_adapters.remove(name)
                self._weight_changed()
        for field in ad.registered:
            del self._parameters[self.param_name(field, name)]
        del self._adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def base_layer(self) -> Module:
        """The wrapped layer, sharing this layer's weight (and bias) Parameters."""
        return self._base

    @property
    def quantized(self) -> bool:
        """The base weight is held quantized (a lora.nn.QuantLinear or QuantEmbedding)."""
        return isinstance(self._base, (QuantLinear, QuantEmbedding))

    @property
    def compute_dtype(self) -> np.dtype:
        """The dtype of inputs and outputs: the weight's, or a quantized base's."""
        return self._base.compute_dtype if self.quantized else self.weight.dtype

    def _live(self) -> list[Adapter]:
        """The adapters a forward adds: the active ones, none when merged or disabled (a
        merged layer computes its merged weight alone, as PEFT's)."""
        if self.disabled or self.merged:
            return []
        return [self._adapters[n] for n in self.active_adapters]

    def _row_ids(self, batch: int) -> tuple[np.ndarray, list[Adapter], dict]:
        """In a mixed batch: each batch row's index into the adapters of this layer that
        the batch uses (-1: none), those adapters, and the context's cache for the layer."""
        names, where, cache = self._batch_adapters
        if batch != len(names):
            raise ValueError(f"lora.adapter_names: {len(names)} adapter names for a batch of "
                             f"{batch} rows ({where}); give one per row of the batch")
        if "ids" not in cache:
            used = list(dict.fromkeys(n for n in names if n in self._adapters))
            cache["ids"] = np.array([used.index(n) if n in self._adapters else -1
                                     for n in names], np.int64)
            cache["adapters"] = [self._adapters[n] for n in used]
        return cache["ids"], cache["adapters"], cache

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """weight += scaling * (B @ A), in place, for each of `adapter_names` (default: the
        active adapters) not merged yet. With safe_merge each result is computed in a copy
        and committed only if it is finite."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self._adapters and n not in self.merged_adapters]
        if not names:
            return
        if self.quantized:
            raise ValueError(f"{type(self).__name__}.merge: the base weight is quantized "
                             f"({self._base.qtype}) and cannot take the update in place; "
                             "lora.merge_and_unload gives the merged model in float weights")
        self._check_alone([self._adapters[n] for n in self.merged_adapters + names],
                          "merging several adapters")
        for name in names:
            ad = self._adapters[name]
            if safe_merge:
                merged = self.weight.data.copy()
                state = self._merge_one(merged, ad)
                if not np.isfinite(merged).all():
                    raise ValueError(f"{type(self).__name__}.merge: the merged weight is not "
                                     f"finite (adapter {name!r})")
                self.weight.data[...] = merged
            else:
                state = self._merge_one(self.weight.data, ad)
            ad.merge_state = state
            self.merged_adapters.append(name)
        self._weight_changed()

    def unmerge(self) -> None:
        """Undo merge() (weight -= scaling * (B @ A) for each merged adapter, last first);
        does nothing when not merged."""
        if not self.merged:
            return
        for name in reversed(self.merged_adapters):
            self._unmerge_one(self.weight.data, self._adapters[name])
        self.merged_adapters = []
        self._weight_changed()


class LoRALinear(_Packable, _LoRABase):
    """A Linear (or Conv1D) layer with LoRA updates, one or several named adapters.

    Shapes: x (..., in), weight (out, in) ((in, out) when fan_in_fan_out), lora_A (r, in),
    lora_B (out, r), y (..., out). The base weight is frozen; its bias keeps whatever
    requires_grad it had. Dropout (probability lora_dropout, training mode only) applies to
    the LoRA branch's input; each forward draws a fresh mask seed from `rng` and backward
    replays it. When merged (or with adapters disabled) the forward is the plain dense layer.
    Several active adapters sum, as PEFT's; in a mixed batch (lora.adapter_names) each row
    of the batch takes its own adapter (forward only). pack() keeps a packed copy of the
    frozen weight for small batches (lora.nn.pack_weights).
    """

    lora_A = _pair_property(0, "lora_A (r, in)")
    lora_B = _pair_property(1, "lora_B (out, r)")

    def __init__(
        self,
        base: Linear | Conv1D,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        rng: np.random.Generator | None = None,
        loftq_config: dict | None = None,
        adapter_name: str = ADAPTER_NAME,
        variant: str = "lora",
        variant_options: dict | None = None,
    ):
        super().__init__()
        if not isinstance(base, self._BASES):
            raise TypeError(f"{type(self).__name__} wraps a "
                            f"{' or '.join(b.__name__ for b in self._BASES)}, got "
                            f"{type(base).__name__}")
        check_adapter_args(type(self).__name__, adapter_name, r, lora_alpha, lora_dropout)
        self._setup(base, rng)
        self.bias = base.bias
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora=use_rslora,
                         init_lora_weights=init_lora_weights, loftq_config=loftq_config,
                         variant=variant, variant_options=variant_options)

    _KIND = "linear"
    _BASES = (Linear, Conv1D)

    @property
    def _dims(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def file_shapes(self, r: int) -> tuple[tuple, tuple]:
        """The shapes of an adapter's A and B of rank r in adapter_model.safetensors (PEFT's:
        (r, in), (out, r) here; a conv's are conv kernels, lora/tuners/conv.py)."""
        return (r, self.in_features), (self.out_features, r)

    @property
    def _transposed(self) -> bool:
        return self.fan_in_fan_out

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8,
                    lora_dropout: float = 0.0, *, use_rslora: bool = False,
                    init_lora_weights: bool | str = True,
                    loftq_config: dict | None = None, variant: str = "lora",
                    variant_options: dict | None = None) -> Adapter:
        """Add adapter `name` (inactive and frozen unless it is the layer's first), of
        `variant` (a name in lora.tuners.variants.VARIANTS: "lora", "dora", "vera"), with
        what the variant's layers share (Variant.options; VeRA's projections)."""
        ad = self._new_adapter(name, r, lora_alpha, use_rslora, lora_dropout,
                               self.compute_dtype, variant, variant_options)
        self._init_adapter(name, init_lora_weights, loftq_config)
        return ad

    def _weight_arg(self, x: np.ndarray, backward: bool = False):
        if isinstance(self._base, QuantLinear):
            return self._base._weight_arg(x, backward)
        return super()._weight_arg(x, backward)

    def merged_float_base(self, safe_merge: bool = False,
                          adapter_names: list[str] | None = None) -> Linear:
        """For a quantized base: a new float Linear holding dequantize(W) plus scaling * B A
        of each of `adapter_names` (default: the active adapters), and the base's bias (the
        merged weight is not quantized again)."""
        if not self.quantized:
            raise ValueError("LoRALinear.merged_float_base: the base is not quantized; merge()")
        layer = self._base.to_linear()
        names = self.active_adapters if adapter_names is None else adapter_names
        ads = [self._adapters[n] for n in names if n in self._adapters]
        self._check_alone(ads, "merging several adapters")
        for ad in ads:
            self._merge_one(layer.weight.data, ad)
        if safe_merge and not np.isfinite(layer.weight.data).all():
            raise ValueError("LoRALinear.merge: the merged weight is not finite")
        return layer

    def _weight_out_in(self) -> np.ndarray:
        if isinstance(self._base, QuantLinear):
            return self._base.dequantize()
        w = self.weight_2d()
        return np.ascontiguousarray(w.T) if self.fan_in_fan_out else w

    def forward(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """The base layer plus the active adapters' LoRA branches, plus `residual` (a skip
        connection, added in the same pass) if given."""
        x = as_input(x, self.compute_dtype)
        if self.disabled and self.merged:
            self.unmerge()  # as PEFT: running without the adapter needs the base weight back
        W, fifo = self._weight_arg(x)  # read in place in either layout, or packed
        bias = None if self.bias is None else self.bias.data
        if self._batch_adapters is not None and not self.disabled:
            return self._mixed_forward(x, W, fifo, bias, residual)
        live = self._live()
        if not live:
            self._save("dense", x)
            return F.dense_forward(x, W, bias, fan_in_fan_out=fifo, residual=residual)
        self._check_alone(live, "several active adapters")
        return live[0].variant.linear_forward(self, live, x, W, fifo, bias, residual)

    def _mixed_forward(self, x, W, fifo, bias, residual):
        if self.merged:
            raise ValueError("LoRALinear: a mixed-adapter batch (lora.adapter_names) needs "
                             "unmerged adapters; unmerge first")
        if x.ndim < 2:
            raise ValueError(f"LoRALinear: a mixed-adapter batch needs x of shape (batch, ..., "
                             f"in), got {x.shape}")
        ids, ads, cache = self._row_ids(x.shape[0])
        self._check_mixed(ads)
        ids = np.broadcast_to(ids.reshape((-1,) + (1,) * (x.ndim - 2)), x.shape[:-1])
        self._save("mixed")
        if "Bt" not in cache and not cache.setdefault("seen", False):
            cache["seen"] = True  # one forward: the kernel transposes B per segment
            return F.mixed_forward(x, W, [ad.A.data for ad in ads], [ad.B.data for ad in ads],
                                   [ad.scaling for ad in ads], ids, bias, fan_in_fan_out=fifo,
                                   residual=residual)
        if "Bt" not in cache:  # a second forward (a decode loop): keep B^T for the context
            cache["A"] = [ad.A.data for ad in ads]
            cache["Bt"] = [np.ascontiguousarray(ad.B.data.T) for ad in ads]
            cache["scales"] = [ad.scaling for ad in ads]
        return F.mixed_forward(x, W, cache["A"], cache["Bt"], cache["scales"], ids, bias,
                               fan_in_fan_out=fifo, residual=residual, b_transposed=True)

    def backward(self, dout: np.ndarray, add_dx_to: np.ndarray | None = None) -> np.ndarray:
        """dx (None without need_input_grad); with `add_dx_to`, dx is added to that array in
        place and it is returned."""
        kind, *rest = self._saved()
        if kind == "mixed":
            raise RuntimeError("LoRALinear.backward: mixed-adapter batches (lora.adapter_names) "
                               "are forward only; train each adapter on its own batches")
        x = rest[1] if kind == "variant" else rest[0]
        W, fifo = self._weight_arg(x, backward=self.need_input_grad)
        add_dx_to = add_dx_to if self.need_input_grad else None
        if kind == "dense":
            if self.merged and any(p.requires_grad for ad in self._adapters.values()
                                   for p in ad.params()):
                raise RuntimeError("LoRALinear.backward: the layer is merged; unmerge() to train")
            dx, _ = F.dense_backward(dout, x, W, need_dx=self.need_input_grad, need_dweight=False,
                                     fan_in_fan_out=fifo, add_dx_to=add_dx_to)
        else:
            variant, _, saved = rest
            dx = variant.linear_backward(self, saved, x, dout, W, fifo, add_dx_to)
        if self.weight.requires_grad:
            _, dW = F.dense_backward(dout, x, self.weight_2d(), need_dx=False,
                                     fan_in_fan_out=self.fan_in_fan_out)
            self.weight.accumulate(dW.reshape(self.weight.shape))
        if self.bias is not None and self.bias.requires_grad:
            self.bias.accumulate(_rows(dout).sum(axis=0))
        return dx

    def extra_repr(self) -> str:
        named = "" if list(self._adapters) == [ADAPTER_NAME] else (
            f", adapters={list(self._adapters)}, active={self.active_adapters}")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, dropout={self.lora_dropout}, merged={self.merged}"
            + named
        )


class LoRAEmbedding(_LoRABase):
    """An Embedding with LoRA updates, as PEFT: lora_embedding_A (r, num_embeddings),
    lora_embedding_B (embedding_dim, r), y = W[ids] + scaling * A^T[ids] B^T; no dropout.
    ids is an integer array of any shape, y is ids.shape + (embedding_dim,). Named adapters,
    several active ones and mixed batches as LoRALinear."""

    _PAIR = ("lora_embedding_A", "lora_embedding_B")
    lora_embedding_A = _pair_property(0, "lora_embedding_A (r, num_embeddings)")
    lora_embedding_B = _pair_property(1, "lora_embedding_B (embedding_dim, r)")

    def __init__(
        self,
        base: Embedding,
        r: int = 8,
        lora_alpha: float = 8,
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        rng: np.random.Generator | None = None,
        adapter_name: str = ADAPTER_NAME,
        variant: str = "lora",
        variant_options: dict | None = None,
    ):
        super().__init__()
        if not isinstance(base, Embedding):
            raise TypeError(f"LoRAEmbedding wraps an Embedding, got {type(base).__name__}")
        check_adapter_args("LoRAEmbedding", adapter_name, r, lora_alpha, 0.0)
        self._setup(base, rng)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.add_adapter(adapter_name, r, lora_alpha, use_rslora=use_rslora,
                         init_lora_weights=init_lora_weights, variant=variant,
                         variant_options=variant_options)

    _KIND = "embedding"
    _transposed = True  # the weight is (num_embeddings, dim) = (d_in, d_out)

    @property
    def _dims(self) -> tuple[int, int]:
        return self.embedding_dim, self.num_embeddings

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8,
                    lora_dropout: float = 0.0, *, use_rslora: bool = False,
                    init_lora_weights: bool | str = True, loftq_config=None,
                    variant: str = "lora", variant_options: dict | None = None) -> Adapter:
        """Add adapter `name` (inactive and frozen unless it is the layer's first); PEFT's
        embedding LoRA has no dropout, so lora_dropout is not used."""
        dtype = getattr(self._base, "compute_dtype", self.weight.dtype)
        ad = self._new_adapter(name, r, lora_alpha, use_rslora, lora_dropout, dtype, variant,
                               variant_options)
        self._init_adapter(name, init_lora_weights)
        return ad

    def forward(self, ids: np.ndarray) -> np.ndarray:
        if self.disabled and self.merged:
            self.unmerge()
        ids = _check_ids(ids, self.num_embeddings)
        y = self._base.lookup(ids) if self.quantized else self.weight.data[ids]
        if self._batch_adapters is not None and not self.disabled:
            if self.merged:
                raise ValueError("LoRAEmbedding: a mixed-adapter batch needs unmerged adapters")
            if ids.ndim == 0:
                raise ValueError("LoRAEmbedding: a mixed-adapter batch needs ids of shape "
                                 "(batch, ...), got a scalar")
            rows, ads, _ = self._row_ids(ids.shape[0])
            self._check_mixed(ads)
            for k in np.unique(rows[rows >= 0]):
                ad, sel = ads[k], rows == k
                y[sel] += ad.scaling * (ad.A.data.T[ids[sel]] @ ad.B.data.T)
            self._save("mixed", ids)
            return y
        live = self._live()
        if not live:
            self._save("base", ids)
            return y
        self._check_alone(live, "several active adapters")
        return live[0].variant.embedding_forward(self, live, ids, y)

    def backward(self, dout: np.ndarray) -> None:
        kind, *rest = self._saved()
        if kind == "mixed":
            raise RuntimeError("LoRAEmbedding.backward: mixed-adapter batches are forward only")
        if kind == "variant":
            variant, ids, saved = rest
            dout = variant.embedding_backward(self, saved, ids, dout)
        else:
            (ids,) = rest
            if self.merged and any(p.requires_grad for ad in self._adapters.values()
                                   for p in ad.params()):
                raise RuntimeError("LoRAEmbedding.backward: the layer is merged; unmerge() to "
                                   "train")
        if self.weight.requires_grad:
            self.weight.accumulate(_scatter_rows(ids, dout, self.weight.shape, self.padding_idx))

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, "
            f"scaling={self.scaling:g}, merged={self.merged}"
        )


def init_lora_weights(layer: LoRALinear | LoRAEmbedding, init: bool | str = True,
                      loftq_config: dict | None = None, *,
                      adapter_name: str | None = None) -> None:
    """Initialise a LoRA layer's A and B in place, as PEFT's `init_lora_weights`.

    LoRALinear: True: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0;
    "gaussian": A ~ N(0, (1/r)^2), B = 0; False: A as True and B ~ U(-1/sqrt(r), 1/sqrt(r))
    (not a no-op; for tests); "pissa": A, B from the top-r singular triplets of W and the base
    weight replaced by W - scaling * B A (Meng et al. 2024); "olora": A, B from W's QR
    decomposition, base likewise replaced (Buyukakyuz 2024); "loftq": the base becomes a
    lora.nn.QuantLinear holding W quantized and A, B come from LoftQ (lora.quant.loftq; Li et
    al. 2023), so the quantized base plus the update starts close to W; loftq_config as
    LoraConfig's (default NF4, one iteration). LoRAEmbedding: any true value
    gives A = 0, B ~ N(0, 1); False gives A, B ~ N(0, 1). Random draws use layer.rng.
    `adapter_name` picks the adapter (default: the active one).
    """
    if not isinstance(layer, (LoRALinear, LoRAEmbedding)):
        raise TypeError(f"init_lora_weights: not a LoRA layer: {type(layer).__name__}")
    rng, dtype = layer.rng, getattr(layer, "compute_dtype", layer.weight.dtype)
    ad = layer._current() if adapter_name is None else layer.adapter(adapter_name)
    A, B, r = ad.A, ad.B, ad.r
    if isinstance(layer, LoRAEmbedding):
        A.data[...] = rng.standard_normal(A.shape) if init is False else 0
        B.data[...] = rng.standard_normal(B.shape)
        return
    if init is True or init is False:
        A.data[...] = rng.uniform(-1, 1, A.shape) / math.sqrt(layer.in_features)
        B.data[...] = 0 if init else rng.uniform(-1, 1, B.shape) / math.sqrt(r)
    elif init == "gaussian":
        A.data[...] = rng.standard_normal(A.shape) / r
        B.data[...] = 0
    elif init == "loftq":
        _loftq_init(layer, ad, loftq_config or {})
    elif init in ("pissa", "olora"):
        if isinstance(layer.base_layer(), QuantLinear):
            raise ValueError(f"init_lora_weights={init!r} replaces the base weight, which is "
                             "quantized here; initialise before quantizing")
        if layer.merged:
            raise RuntimeError("init_lora_weights: unmerge() before a pissa/olora init")
        W = layer._weight_out_in().astype(np.float64)  # (out, in); decompositions in float64
        if r > min(W.shape):
            raise ValueError(f"init_lora_weights={init!r}: r={r} exceeds min{W.shape}")
        if init == "pissa":
            U, S, Vt = np.linalg.svd(W, full_matrices=False)
            root = np.sqrt(S[:r] / ad.scaling)
            a, b = root[:, None] * Vt[:r], U[:, :r] * root
        else:
            Q, R = np.linalg.qr(W)
            a, b = R[:r], Q[:, :r]
        A.data[...], B.data[...] = a, b
        residual = (W - ad.scaling * (b @ a)).astype(dtype)
        layer.weight.data[...] = (residual.T if layer.fan_in_fan_out else residual).reshape(
            layer.weight.shape)
    else:
        raise ValueError(f"init_lora_weights: unknown method {init!r}")


def _loftq_init(layer: LoRALinear, ad: Adapter, loftq_config: dict) -> None:
    from .. import quant
    from .config import loftq_qtype

    qtype, iters = loftq_qtype(loftq_config)
    if layer.quantized:
        raise ValueError("init_lora_weights='loftq' needs the float base weight, and this one "
                         "is quantized already; wrap the float model (LoftQ quantizes it)")
    if layer.fan_in_fan_out or layer.merged:
        raise ValueError("init_lora_weights='loftq': the base must be an unmerged Linear "
                         "(not a Conv1D)")
    q, a, b = quant.loftq(layer.weight.data, ad.r, qtype, iters, ad.scaling)
    ad.A.data[...], ad.B.data[...] = a, b
    base = QuantLinear(q, None, dtype=layer.compute_dtype)
    base.bias = layer.bias
    layer.unpack()
    object.__setattr__(layer, "_base", base)
    layer.weight = base.weight


_init_weights = init_lora_weights  # the layers' argument of the same name shadows it

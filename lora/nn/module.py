"""The module system of lora.nn: Parameter, Module and the containers.

A `Module` holds `Parameter`s and child modules under PyTorch's names ("0", "fc1",
"layers.3.attn.q_proj"), so a PyTorch or Hugging Face state dict, and a PEFT adapter, map onto
a mirrored model by name. Each layer's `forward` caches, in training mode only, the little its
`backward(dout) -> din` needs; `backward` accumulates into `Parameter.grad` (like torch) and
computes nothing for a frozen parameter.

Deliberately not here: autograd, devices, hooks, buffers. A module called twice in one forward
pass keeps only the last call's cache, so weight sharing needs its own module. The layers are
in lora/nn/layers.py, the losses in lora/nn/losses.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from .._checks import kernel_dtype

__all__ = ["Parameter", "Module", "Sequential", "ModuleList", "ModuleDict"]


class Parameter:
    """A trainable array. `data` is the value (C-contiguous, updated in place by optimizers),
    `grad` is None or an array of the same shape that backward passes accumulate into."""

    __slots__ = ("data", "grad", "requires_grad")

    def __init__(self, data: np.ndarray, requires_grad: bool = True):
        self.data = np.ascontiguousarray(data)
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def accumulate(self, grad: np.ndarray) -> None:
        """grad += `grad` (the first call stores a copy)."""
        if self.grad is None:
            self.grad = np.array(grad, dtype=self.data.dtype, copy=True).reshape(self.data.shape)
        else:
            self.grad += grad

    def __repr__(self) -> str:
        return (
            f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"
        )


class Module:
    """Base class: named parameters and children, train/eval mode, state dicts.

    Subclasses implement `forward(*args)` and `backward(dout) -> din`. Assigning a Parameter or
    a Module to an attribute registers it under that name, in assignment order.

    `need_input_grad = False` tells a layer that nothing upstream uses its input gradient
    (say, the first layer over frozen embeddings): Linear and LoRALinear then skip computing
    it, as autograd would, and backward returns None.
    """

    need_input_grad = True

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        params, modules = self.__dict__.get("_parameters"), self.__dict__.get("_modules")
        if params is None:
            raise AttributeError("call Module.__init__() before assigning attributes")
        params.pop(name, None)
        modules.pop(name, None)
        self.__dict__.pop(name, None)
        if isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        if name in d.get("_parameters", ()):
            return d["_parameters"][name]
        if name in d.get("_modules", ()):
            return d["_modules"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._modules:
            del self._modules[name]
        else:
            object.__delattr__(self, name)

    # -- structure ---------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(path, module) for this module ("" or `prefix`) and every descendant, depth first."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            path, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield path, module
            children = [(f"{path}.{n}" if path else n, m) for n, m in module._modules.items()]
            stack.extend(reversed(children))

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter), each Parameter once, in registration order."""
        seen = set()
        for path, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def get_submodule(self, path: str) -> Module:
        """The module at dotted `path` ("" is self); AttributeError naming the missing part."""
        module = self
        for part in path.split(".") if path else ():
            if part not in module._modules:
                raise AttributeError(
                    f"{type(module).__name__} has no submodule {part!r} ({path!r})"
                )
            module = module._modules[part]
        return module

    def set_submodule(self, path: str, new: Module) -> None:
        """Replace the module at dotted `path` (not "") by `new`."""
        parent_path, _, name = path.rpartition(".")
        parent = self.get_submodule(parent_path)
        if name not in parent._modules:
            raise AttributeError(f"{type(parent).__name__} has no submodule {name!r} ({path!r})")
        parent._modules[name] = new

    # -- modes and gradients -----------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (grad = None, torch's default)."""
        for p in self.parameters():
            p.grad = None

    def astype(self, dtype) -> Module:
        """Convert every parameter to `dtype` (float32 or float64) in place; returns self.
        TypeError for any other dtype (float16, say), before anything is converted."""
        dtype = kernel_dtype(dtype, f"{type(self).__name__}.astype")
        for p in self.parameters():
            p.data = np.ascontiguousarray(p.data, dtype=dtype)
            p.grad = None
        return self

    # -- state dicts -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """{dotted name: array}; the arrays are the parameters' own (not copies)."""
        return {name: p.data for name, p in self.named_parameters()}

    def _weight_changed(self) -> None:
        """Called after load_state_dict (and a LoRA merge) wrote this module's weight; a layer
        that keeps a derived copy of it (a packed layer) makes it anew."""

    def load_state_dict(self, state_dict: Mapping[str, np.ndarray], strict: bool = True):
        """Copy values into the parameters by name, keeping each parameter's dtype.

        Every key and shape is checked before anything is copied. With strict=True a missing
        or unexpected key raises KeyError; otherwise they are returned as
        (missing_keys, unexpected_keys). A shape mismatch always raises ValueError.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for k, p in own.items():
            if k in state_dict and np.shape(state_dict[k]) != p.shape:
                raise ValueError(
                    f"load_state_dict: {k!r} has shape {np.shape(state_dict[k])}, "
                    f"the model expects {p.shape}"
                )
        for k, p in own.items():
            if k in state_dict:
                p.data[...] = np.asarray(state_dict[k])
        for m in self.modules():
            m._weight_changed()
        return missing, unexpected

    # -- calling -----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        try:
            return self.forward(*args, **kwargs)
        except (TypeError, ValueError) as e:
            _locate(e, self)
            raise

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    # the cache a backward pass needs; one slot per module
    def _save(self, *values) -> None:
        object.__setattr__(self, "_cache", values if self.training else None)

    def _saved(self) -> tuple:
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward: no forward pass cached; call the module in "
                "training mode (model.train()) before backward, once per backward"
            )
        object.__setattr__(self, "_cache", None)
        return cache


def _locate(e: BaseException, module: Module) -> None:
    """Prefix the message of an error raised inside `module`'s forward with the module that
    raised it and its path from the outermost module called: "Linear at 'encoder.layer.0.
    attention.self.query': ...". Each enclosing Module.__call__ adds its part of the path as
    the error passes through it; nothing is done on the way in, so calls cost nothing."""
    where = e.__dict__.get("_lora_where")
    if where is None:
        if len(e.args) != 1 or not isinstance(e.args[0], str) or str(e) != e.args[0]:
            return  # an error that does not print its args as they are: leave it alone
        where = {"leaf": type(module).__name__, "path": "", "message": e.args[0]}
    else:
        child = where["module"]
        name = next((n for n, m in module._modules.items() if m is child), None)
        if name is None:  # called through something that is not a child: search below
            name = next((p for p, m in module.named_modules() if p and m is child), None)
        if name is None:
            return
        where["path"] = f"{name}.{where['path']}" if where["path"] else name
    where["module"] = module
    e._lora_where = where
    at = f" at {where['path']!r}" if where["path"] else ""
    e.args = (f"{where['leaf']}{at}: {where['message']}",)


class Sequential(Module):
    """Children named "0", "1", ... (or by an ordered mapping); forward chains them and
    backward runs their backward passes in reverse."""

    def __init__(self, *modules: Module):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], Mapping):
            for name, m in modules[0].items():
                setattr(self, name, m)
        else:
            for i, m in enumerate(modules):
                setattr(self, str(i), m)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def backward(self, dout):
        for m in reversed(self._modules.values()):
            dout = m.backward(dout)
        return dout


class ModuleList(Module):
    """A list of modules named "0", "1", ...; no forward of its own."""

    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> ModuleList:
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __setitem__(self, i: int, module: Module) -> None:
        setattr(self, list(self._modules)[i], module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())


class ModuleDict(Module):
    """Modules by name; no forward of its own."""

    def __init__(self, modules: Mapping[str, Module] | None = None):
        super().__init__()
        for name, m in (modules or {}).items():
            setattr(self, name, m)

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __setitem__(self, name: str, module: Module) -> None:
        setattr(self, name, module)

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()

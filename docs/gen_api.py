"""Regenerate docs/api.md from the public names (`__all__`) and docstrings of lora's modules.

    python docs/gen_api.py            # rewrites docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date

The reference is generated so it cannot drift from the code: a docstring is the one place a
function's contract is written. What this script does not do: render HTML, or document
private names (those starting with "_").
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

# (module, what it is for) in reading order; a module's public names are its __all__.
MODULES = [
    ("lora", "The top-level names: everything a fine-tuning script needs."),
    ("lora.functional", "The C kernels on NumPy arrays, stateless."),
    ("lora.nn", "A minimal module system with hand-written backward passes."),
    ("lora.tuners", "LoraConfig, the LoRA layers, putting LoRA on a model and taking it off."),
    ("lora.optim", "Adam/AdamW on the fused C kernel, LoRA+, clipping, schedules."),
    ("lora.quant", "Quantized blocks: GGUF's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K, NF4 and NF4_DQ, LoftQ."),
    ("lora.io", "Files: PEFT adapters, `lora merge` into Hugging Face checkpoints, safetensors."),
    ("lora.models", "Pretrained transformers on lora.nn: BERT encoders, Llama-family LMs."),
    ("lora.models.llama", "Llama-family causal LMs (Llama, Mistral, Qwen2) on lora.nn."),
    ("lora.models.generation", "Greedy and sampled generation with a KV cache, streaming."),
    ("lora.models.data", "Tokenizer and text data for lora.models (needs `tokenizers`)."),
    ("lora.models.gguf", "GGUF files: the header, dequantization, Llama-family weights."),
    ("lora.models.gguf_export", "A merged Llama-family model written as a GGUF file."),
    ("lora.models.lm_data", "Causal-LM training rows: packed text, masked chat examples."),
    ("lora.distributed", "Data-parallel training and scoring on Dask (needs `lora[dask]`)."),
    ("lora.data", "The digits data set and base model that ship inside the package."),
    ("lora.cli", "The `lora` command line."),
    ("lora.cli.demo", "`lora demo`."),
]

HEADER = """# API reference

Every public name of `lora`, module by module: its signature and its docstring. Generated
from the code by `python docs/gen_api.py` (tests/test_docs.py checks that every public name
is here). Shapes follow PyTorch/PEFT: a weight is `(d_out, d_in)`, `A` is `(r, d_in)`, `B` is
`(d_out, r)`, `x` is `(..., d_in)`. For the ideas behind the names see
[concepts](concepts.md); for where each piece lives, [design](design.md).

"""


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        # Annotations are strings under `from __future__ import annotations`: show them bare.
        params = [p.replace(annotation=_bare(p.annotation)) for p in sig.parameters.values()]
        sig = sig.replace(parameters=params, return_annotation=_bare(sig.return_annotation))
        return str(sig)
    if True:
        doc = inspect.getdoc(obj) or ""
        first = doc.splitlines()[0] if doc else ""
        return first[first.index("("):] if "(" in first and first.endswith(")") else "(...)"


class _Bare(str):
    def __repr__(self) -> str:
        return str(self)


def _bare(annotation):
    if isinstance(annotation, str):
        return _Bare(annotation)
    return annotation


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or "(no docstring)"
    lines = doc.splitlines()
    if lines and lines[0].startswith(getattr(obj, "__name__", "\0") + "("):
        lines = lines[1:]  # C functions repeat their signature in the docstring
        while lines and lines[0].strip() in ("", "--"):
            lines = lines[1:]
    return "\n".join(lines)


def _public_names(module) -> list[str]:
    """The module's __all__, or else the public names it defines itself."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [n for n, v in vars(module).items() if not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__]


def _home(obj) -> str | None:
    """The documented module whose __all__ holds `obj` under the same name, if not `lora`."""
    name = getattr(obj, "__name__", None)
    for module_name, _ in MODULES[1:]:
        module = sys.modules.get(module_name)
        if module and name in _public_names(module) and getattr(module, name) is obj:
            return module_name
    return None


def _entry(module_name: str, name: str, obj) -> list[str]:
    qual = f"{module_name}.{name}"
    out = []
    home = _home(obj) if module_name == "lora" and not inspect.ismodule(obj) else None
    if home:
        return [f"- `{qual}`: {_first_para(obj).split('. ')[0].rstrip('.')}. "
                f"See [`{home}.{name}`](#{_anchor(home)}).", ""]
    if inspect.ismodule(obj):
        target = obj.__name__
        out += [f"### `{qual}`", "", f"Module; see [`{target}`](#{_anchor(target)}).", ""]
        return out
    if inspect.isclass(obj):
        out += [f"### `{qual}{_signature(obj)}`", "", "*class*" + (
            f" (defined in `{obj.__module__}`)" if obj.__module__ != module_name else ""), "",
            _indent_doc(_doc(obj)), ""]
        for meth_name, meth in sorted(vars(obj).items()):
            if meth_name.startswith("_") or not (inspect.isfunction(meth) or
                                                 isinstance(meth, (classmethod, staticmethod,
                                                                   property))):
                continue
            if isinstance(meth, property):
                out += [f"- `{name}.{meth_name}` (property): {_first_line(meth.fget)}"]
                continue
            func = meth.__func__ if isinstance(meth, (classmethod, staticmethod)) else meth
            if meth_name == "extra_repr":
                continue
            summary = _first_para(func) if inspect.getdoc(func) else ""
            out += [f"- `{name}.{meth_name}{_signature(func)}`" + (f": {summary}" if summary
                                                                      else "")]
        out.append("")
        return out
    if callable(obj):
        where = getattr(obj, "__module__", module_name)
        note = f" (defined in `{where}`)" if where and where != module_name else ""
        out += [f"### `{qual}{_signature(obj)}`", ""]
        if note:
            out += [f"*function*{note}", ""]
        out += [_indent_doc(_doc(obj)), ""]
        return out
    out += [f"### `{qual}`", "", f"Value: `{_value(obj)}`", ""]
    return out


def _value(obj) -> str:
    """repr(obj), except that a path inside the installed package (lora.data.DATA_DIR, say)
    is shown relative to it: where the package sits is the building machine's business."""
    if isinstance(obj, str) and os.path.isabs(obj):
        package = os.path.dirname(os.path.abspath(importlib.import_module("lora").__file__))
        if os.path.commonpath([package, os.path.abspath(obj)]) == package:
            rel = os.path.relpath(obj, package).replace(os.sep, "/")
            return "<lora package>" + ("" if rel == "." else "/" + rel)
    return repr(obj)


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def _first_para(obj) -> str:
    doc = _doc(obj) if inspect.getdoc(obj) else ""
    return " ".join(doc.split("\n\n")[0].split())


def _indent_doc(doc: str) -> str:
    # Docstrings are plain text with numpydoc sections; a fenced block keeps their layout.
    return "```text\n" + doc + "\n```"


def _anchor(module_name: str) -> str:
    return module_name.replace(".", "")


def generate() -> str:
    for module_name, _ in MODULES:
        try:
            importlib.import_module(module_name)
        except ImportError:
            pass
    parts = [HEADER, "## Contents", ""]
    for module_name, summary in MODULES:
        parts.append(f"- [`{module_name}`](#{_anchor(module_name)}): {summary}")
    parts.append("")
    for module_name, summary in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            parts += [f"## {module_name}", "", f"(not importable here: {e})", ""]
            continue
        parts += [f"## {module_name}", "", summary, ""]
        head = (inspect.getdoc(module) or "").split("\n\n")[0]
        if head:
            parts += ["> " + " ".join(head.split()), ""]
        for name in _public_names(module):
            if name == "__version__":
                parts += [f"### `{module_name}.__version__`", "",
                          f"The package version, `{module.__version__!r}`.", ""]
                continue
            parts += _entry(module_name, name, getattr(module, name))
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api.md")
    text = generate()
    if "--check" in argv:
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{path} is out of date: run python docs/gen_api.py", file=sys.stderr)
                return 1
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

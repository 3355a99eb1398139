"""The README and docs/ must not rot: their Python code blocks run, their links resolve, and
the API reference covers every public name.

Code runs for the pages in RUN_PAGES (the README and the guides whose examples are complete
programs); a page whose examples need files a reader brings (a Llama checkpoint, say) is
left out of that list and only its links are checked. A ```python block runs as written,
in a temporary directory; the blocks of one page share a namespace, in order, like a notebook.
A block whose first line is `# requires: a, b` is skipped unless those modules import (the
page's later blocks too, since they may build on it).
Blocks in other languages (bash, text) are not run here; the commands they show are exercised
by tests/test_cli.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

# Modules of the API reference, as docs/gen_api.py lists them.
API_MODULES = ["lora", "lora.functional", "lora.nn", "lora.tuners", "lora.optim", "lora.io",
               "lora.models", "lora.data", "lora.cli", "lora.cli.demo"]


def python_blocks(path: pathlib.Path) -> list[str]:
    return [code for lang, code in FENCE.findall(path.read_text(encoding="utf-8"))
            if lang == "python"]


RUN_PAGES = ["README.md", "getting-started.md", "concepts.md", "adapter-format.md",
             "design.md", "index.md", "quantization.md", "adapters.md", "variants.md"]
PAGES_WITH_CODE = [p for p in PAGES if p.name in RUN_PAGES and python_blocks(p)]


def test_readme_and_docs_have_code_to_run():
    names = {p.name for p in PAGES_WITH_CODE}
    assert {"README.md", "getting-started.md", "concepts.md", "adapter-format.md"} <= names


@pytest.mark.parametrize("path", PAGES_WITH_CODE, ids=[p.name for p in PAGES_WITH_CODE])
def test_python_blocks_run(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(python_blocks(path)):
        first = code.splitlines()[0] if code.strip() else ""
        if first.startswith("# requires:"):
            needed = [m.strip() for m in first.split(":", 1)[1].split(",") if m.strip()]
            missing = [m for m in needed if importlib.util.find_spec(m) is None]
            if missing:
                pytest.skip(f"block {i} of {path.name} needs {', '.join(missing)}")
        exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)  # noqa: S102


def test_readme_quickstart_prints_a_good_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks(ROOT / "README.md")[0], "README.md", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert "trainable params: 16,976" in out
    accuracy = float(re.search(r"accuracy: ([\d.]+)%", out).group(1))
    assert accuracy > 85.0
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("path", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        file = (path.parent / target.split("#")[0]).resolve()
        assert file.exists(), f"{path.name} links to {target}, which does not exist"


def public_names(module) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [n for n, v in vars(module).items() if not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__]


@pytest.mark.parametrize("module_name", API_MODULES)
def test_api_reference_covers_every_public_name(module_name):
    module = pytest.importorskip(module_name)
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert f"## {module_name}\n" in api
    missing = [n for n in public_names(module) if f"`{module_name}.{n}" not in api]
    assert missing == [], f"docs/api.md lacks {missing}: run python docs/gen_api.py"


def test_readme_states_the_two_setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install . && lora demo" in text
    assert "bash .ci/run" in text
    assert (ROOT / ".ci" / "run").is_file()


def test_no_path_of_this_machine_in_the_docs():
    """docs/api.md is generated on some machine; where the package or the clone sits there
    must not show (lora.data.DATA_DIR was rendered as an absolute path), nor in any page."""
    import sys

    import lora

    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_api
    finally:
        sys.path.pop(0)
    package = str(pathlib.Path(lora.__file__).resolve().parent)
    generated = gen_api.generate()
    assert "`<lora package>/data/digits.csv.gz`" in generated
    for name, text in [("generated api.md", generated)] + [
            (p.name, p.read_text(encoding="utf-8")) for p in PAGES]:
        for path in (package, str(ROOT), str(pathlib.Path.home())):
            if len(path) < 5:  # a home of "/" says nothing
                continue
            assert path not in text, f"{name} shows {path}"
        assert not re.search(r"(?<![\w.])/(home|work|Users|tmp)/\w", text), name

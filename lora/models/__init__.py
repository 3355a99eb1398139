"""lora.models: pretrained transformer encoders and Llama-family decoders on lora.nn, loaded
from Hugging Face checkpoint directories, for LoRA fine-tuning without PyTorch.

A model is one file (bert.py, llama.py); hf.py reads the checkpoint directory every model loads from
(config.json, safetensors weights, `Weights` to build layers from them) and holds the table of
which class loads which model_type (`LOADERS`, used by `from_pretrained(directory)`),
memory.py tunes malloc for training loops. Every from_pretrained returns its model in eval
mode, as transformers does.

The text helpers (`Tokenizer`, the sentence set) live in lora.models.data and need the optional
`tokenizers` package (`pip install 'lora[models]'`); the models themselves need only NumPy and
safetensors.
"""

from .bert import BertConfig, BertForSequenceClassification, BertModel, cls_pool, mean_pool
from .hf import LOADERS, from_pretrained, load_safetensors_dir
from .llama import LlamaConfig, LlamaForCausalLM

__all__ = [
    "BertConfig", "BertModel", "BertForSequenceClassification", "mean_pool", "cls_pool",
    "LOADERS", "from_pretrained", "load_safetensors_dir", "LlamaConfig", "LlamaForCausalLM",
]

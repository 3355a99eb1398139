"""lora.io: files. safetensors.py is the one safetensors reader and writer (bfloat16 included);
peft.py PEFT's adapter directory (names, keys, checked reading); adapter.py save_adapter and
load_adapter; checkpoint.py the streaming merge into Hugging Face checkpoints (`lora merge`).
Model checkpoints (config.json + weights) are read by lora.models.hf on top of safetensors.py.
"""

from .adapter import adapter_state_dict, load_adapter, save_adapter
from .checkpoint import CheckpointError, merge_checkpoint
from .peft import AdapterFormatError
from .safetensors import SafetensorsError

__all__ = [
    "AdapterFormatError",
    "CheckpointError",
    "SafetensorsError",
    "adapter_state_dict",
    "load_adapter",
    "merge_checkpoint",
    "save_adapter",
]

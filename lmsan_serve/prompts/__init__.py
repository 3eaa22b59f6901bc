"""Soft prompts (deep `prefix`, shallow `prompt`) with a classification head on a frozen backbone."""

from .config import DEFAULT_TEMPLATE, PromptConfig
from .model import PromptClassifier, accuracy, train_prompt
from .peft_import import convert_peft_prompt, import_peft_prompt, read_peft_adapter

__all__ = ["DEFAULT_TEMPLATE", "PromptClassifier", "PromptConfig", "accuracy", "convert_peft_prompt",
           "import_peft_prompt", "read_peft_adapter", "train_prompt"]

"""Soft prompts (deep `prefix`, shallow `prompt`) with a classification head on a frozen backbone."""

from .config import DEFAULT_TEMPLATE, PromptConfig
from .model import PromptClassifier, accuracy, train_prompt

__all__ = ["DEFAULT_TEMPLATE", "PromptClassifier", "PromptConfig", "accuracy", "train_prompt"]

"""finechat: QLoRA fine-tuning of chat models, evaluation, merging and a chatbot, offline by default."""

__version__ = "0.1.0"

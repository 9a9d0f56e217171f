"""vlmdrop: training-free visual-token dropping for Hugging Face vision-language models."""

__version__ = "0.1.0"

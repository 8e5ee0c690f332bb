"""megatron_v2pe: long-context vision-language models with V2PE on Megatron-Core."""

__version__ = "0.1.0"

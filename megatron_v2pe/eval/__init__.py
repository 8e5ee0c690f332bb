"""Inference with V2PE: generation with a KV cache, teacher-forced scoring and MM-NIAH scoring rules."""

"""Model weights without optimizer state: a model-only dist checkpoint (``{"model0": ...}`` of a model,
as conversion writes it), or the model part of a training checkpoint. Tensors match by their global
keys, so either loads into any TP/PP/CP layout."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from megatron_v2pe.checkpoint.errors import UnloadableCheckpoint
from megatron_v2pe.checkpoint.layout import resolve_checkpoint
from megatron_v2pe.checkpoint.log import logger
from megatron_v2pe.checkpoint.model_config import MODEL_CONFIG_FILE, saved_model_config, write_model_config
from megatron_v2pe.model.presets import VLMConfig, language_transformer_config, vision_transformer_config
from megatron_v2pe.model.vlm import InternVLModel
from megatron_v2pe.parallel.attention_backends import AttentionBackend

_EMBEDDING = "language_model.embedding.word_embeddings.weight"  # every model has it: its dtype is the model's


def sharded_model_state(chunks: list) -> dict:
    """The dist-checkpoint structure of a model: ``{"model0": ..., "model1": ...}``, one entry per chunk.
    Tensors match by their global keys, so it loads into any TP/PP/CP layout."""
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def build_model(
    config: VLMConfig, dtype: torch.dtype, attention_backend: AttentionBackend = "auto"
) -> InternVLModel:
    """The model at the current parallel layout (TP, and CP for the language model), uninitialised (its
    weights are about to be overwritten). ``megatron_v2pe.parallel.initialize`` must have run."""
    fields = {
        "params_dtype": dtype,
        "perform_initialization": False,
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
    }
    cp = ps.get_context_parallel_world_size()  # the vision tower runs whole tiles: no CP in its config
    return InternVLModel(
        config,
        language_transformer_config(config, **fields, context_parallel_size=cp),
        vision_transformer_config(config, **fields),
        attention_backend=attention_backend,
    )


def save_model(model: InternVLModel, config: VLMConfig, directory: Path) -> None:
    """A model-only dist checkpoint of ``model`` plus its ``vlm_config.json``."""
    dist_checkpointing.save(sharded_model_state([model]), str(directory))
    write_model_config(config, directory)


def model_checkpoint(path: str | Path, config: VLMConfig | None = None) -> tuple[Path, VLMConfig]:
    """(directory of the weights, architecture) of a model-only checkpoint or a training run's
    ``checkpoint.save``. ``config`` defaults to the ``vlm_config.json`` in that directory or in ``path``."""
    if not Path(path).is_dir():
        raise UnloadableCheckpoint(path, "the checkpoint directory does not exist; check the path")
    directory = resolve_checkpoint(path)
    if config is None:
        config = saved_model_config(directory, Path(path))
    if config is None:
        raise UnloadableCheckpoint(path, f"no {MODEL_CONFIG_FILE}: name the architecture (--model-config)")
    return directory, config


def saved_dtype(directory: Path) -> torch.dtype:
    """The dtype the weights in ``directory`` were saved in."""
    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as err:
        raise UnloadableCheckpoint(directory, f"{type(err).__name__}: {err}") from err
    return metadata[_EMBEDDING].dtype


def load_model(
    path: str | Path,
    config: VLMConfig | None = None,
    dtype: torch.dtype | None = None,
    attention_backend: AttentionBackend = "auto",
) -> tuple[InternVLModel, VLMConfig]:
    """The model of a checkpoint (``model_checkpoint`` finds it), whatever TP/PP layout wrote it, at the
    current layout; ``dtype`` defaults to the dtype it was saved in."""
    directory, config = model_checkpoint(path, config)
    model = build_model(config, dtype or saved_dtype(directory), attention_backend)
    try:
        loaded = dist_checkpointing.load(sharded_model_state([model]), str(directory))
    except Exception as err:  # Megatron's errors already list every missing / mismatched tensor
        raise UnloadableCheckpoint(directory, f"{type(err).__name__}: {err}") from err
    model.load_state_dict(loaded["model0"])
    return model, config


def load_model_weights(path: str, model_chunks: list, optimizer) -> None:
    """Model weights only into a training run's chunks, fresh optimizer state: a converted Hugging Face
    model, or a checkpoint directory (the checkpoint a resume would start from) to fine-tune from."""
    source = resolve_checkpoint(path, quiet=False)
    loaded = dist_checkpointing.load(sharded_model_state(model_chunks), str(source))
    for i, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded[f"model{i}"])
    optimizer.reload_model_params()  # the fp32 main copies of bf16 parameters
    logger.info("loaded model weights from %s", source)

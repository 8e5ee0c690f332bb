"""The on-disk checkpoint format. Training, conversion and evaluation read and write checkpoints only
through this package.

A training run's ``checkpoint.save`` (Megatron-LM's names)::

    latest_checkpointed_iteration.txt      the last complete checkpoint (replaced atomically)
    train.lock                             host, pid (and Slurm job) of the run that writes here
    vlm_config.json                        the architecture the checkpoints hold
    iter_0000200/                          Megatron-Core dist checkpoint (torch_dist): model chunks,
                                           optimizer (resharding across TP/PP/CP/DP), LR scheduler
        files.json                         every file of the checkpoint and its size (written last)
        train_state/                       parallel layout, data-loader and RNG states of every rank
    iter_0000300.tmp/                      a save in progress (never read)

A model-only checkpoint (conversion from Hugging Face writes one; training starts from it with a fresh
optimizer, evaluation and export read it)::

    metadata.json, __0_0.distcp, ...       dist checkpoint of {"model0": the model's sharded state}
    vlm_config.json                        its architecture
    tokenizer/                             the tokenizer files it came with

Both load into any TP/PP/CP layout: tensors match by their global keys.

Modules: ``layout`` (directory names, completeness, which checkpoint is resumed from or loaded), ``lock``
(``train.lock``), ``model_config`` (``vlm_config.json`` and ``tokenizer/``), ``model_only`` (weights
without optimizer state), ``train_state`` (the ``Checkpointer`` of a training run, with ``rng``,
``optimizer_state`` and ``save_errors``), ``errors``.
"""

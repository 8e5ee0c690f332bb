"""Data: webdataset shards -> tokenized image-text samples -> packed micro-batches with V2PE positions.

tokenizer (ids and special tokens) · conversation (records, chat templates) · images (tiling) · sample
(record -> tokens, labels, tiles) · shards (format, writing, reading) · source (splitting, shuffling,
blending, resume) · packing (which samples share a pack, loss weights) · loader (what the trainer
iterates) · skips (bad input) · probe (the first samples read before training starts) ·
long_context_synth (synthetic long-context tasks). The batch type, PackedBatch, is ``megatron_v2pe.batch``.
See docs/data_format.md.
"""

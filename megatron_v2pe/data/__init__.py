"""Data: webdataset shards -> tokenized image-text samples -> packed micro-batches with V2PE positions.

tokenizer (ids and special tokens) · conversation (records, chat template) · images (tiling) · sample
(record -> tokens, labels, tiles) · shards (format, writing, reading) · source (splitting, shuffling,
blending, resume) · packing (PackedBatch assembly) · loader (what the trainer iterates) · skips (bad input)
· long_context_synth (synthetic long-context tasks) · batch (the batch type) · synthetic (the LM demo task).
See docs/data_format.md.
"""

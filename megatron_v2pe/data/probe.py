"""A look at the first samples of a dataset before training: do the pack limits let any of them in?

Pack limits smaller than every sample would not fail until the data loader had read a whole epoch, after
the model was built; reading a few samples up front turns that into a message before any work.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

from megatron_v2pe.data.config import DataConfig
from megatron_v2pe.data.loader import PackStream
from megatron_v2pe.data.packing import fit_sample
from megatron_v2pe.data.shards import unpack_sample
from megatron_v2pe.data.skips import BadSample, SkipReason
from megatron_v2pe.data.source import Consumer
from megatron_v2pe.data.tokenizer import Tokenizer
from megatron_v2pe.model.presets import VLMConfig

PACK_LIMITS = (SkipReason.TOO_LONG, SkipReason.TOO_MANY_TILES)


def skips_before_first_fit(
    config: DataConfig, model: VLMConfig, tokenizer: Tokenizer, dataset: int, limit: int
) -> Counter[str] | None:
    """None when one of the first ``limit`` samples that ``config.datasets[dataset]`` gives a single
    reader (unshuffled) fits a pack, or it has none; else how many were skipped for each reason."""
    single = dataclasses.replace(config, datasets=(config.datasets[dataset],), shuffle_buffer=0, num_epochs=1)
    stream = PackStream(single, model, Consumer(0, 1), tokenizer)
    skipped: Counter[str] = Counter()
    for raw in itertools.islice(stream.source, limit):
        try:
            record, images = unpack_sample(raw.members)
            fit = fit_sample(stream.builder.build(raw.key, record, images, ref=raw.ref), stream.pack)
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        if fit.sample is not None:
            return None
        skipped[fit.outcome] += 1
    return skipped or None

"""Gradient index: answer new queries without a pass over the training set.

``build_index`` chooses a compression (:mod:`influence.index.choose`) and stores every
training sequence's gradient for every tracked layer in the factors' eigenbasis
(compressed, :mod:`influence.index.compress`) in memory-mapped shards
(:mod:`influence.index.write`, :mod:`influence.index.store`); ``pairwise_scores(..., index=)``
and ``rank_training(..., index=)`` then answer a query batch with one score block per
chunk of the index (:mod:`influence.index.source`), consumed as a rescan's are
(:mod:`influence.scoring.blocks`), the damping chosen at query time.
"""

from influence.index.build import build_index
from influence.index.compress import Compression
from influence.index.store import Index, open_parts

__all__ = ["Compression", "Index", "build_index", "open_parts"]

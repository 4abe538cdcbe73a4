"""Gradient index: answer new queries without a pass over the training set.

``build_index`` stores every training sequence's gradient for every tracked layer in
the factors' eigenbasis (compressed, :mod:`influence.index.compress`) in memory-mapped
shards (:mod:`influence.index.store`); ``pairwise_scores(..., index=)`` and
``rank_training(..., index=)`` then answer a query batch with one matrix product per
chunk of the index (:mod:`influence.index.score`), the damping chosen at query time.
"""

from influence.index.build import build_index
from influence.index.compress import Compression
from influence.index.store import Index, open_parts

__all__ = ["Compression", "Index", "build_index", "open_parts"]

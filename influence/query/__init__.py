"""Query engine: the most influential training sequences for a query, with token-wise
and layer-wise attribution."""

from influence.query.ranking import Attribution, Ranking, attribute, rank_training

__all__ = ["Attribution", "Ranking", "attribute", "rank_training"]

"""Scoring: preconditioned query gradients dotted with training gradients.

* :mod:`.queries`: preconditioned query gradients (full or rank-r) and their placement;
* :mod:`.contractions`: exact contractions of preconditioned queries with (a, g);
* :mod:`.pairwise`: :func:`pairwise_scores`;
* :mod:`.self_influence`: :func:`self_scores`;
* :mod:`.ranking`: streaming top-k (:func:`rank_training`);
* :mod:`.blocks`: the one consumer of score blocks (a rescan's or an index's): running
  top-k, the all-scores file, collected scores with per-layer totals;
* :mod:`.attribution`: token- and layer-wise split of chosen scores (:func:`attribute`);
* :mod:`.results`: :class:`Scores`, :class:`SelfScores`;
* :mod:`.topk`: exact merges of partial top-k lists.
"""

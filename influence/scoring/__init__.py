"""Scoring: preconditioned query gradients dotted with training gradients.

* :mod:`.contractions`: exact contractions of preconditioned queries with (a, g);
* :mod:`.pairwise`: query gradients, :func:`pairwise_scores`, :func:`self_scores`;
* :mod:`.ranking`: streaming top-k (:func:`rank_training`) and token/layer attribution;
* :mod:`.topk`: exact merges of partial top-k lists.
"""

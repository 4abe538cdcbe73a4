"""Runtime: what every streamed pass needs, whatever it computes.

* :mod:`.driver`: the one resumable pass driver (:class:`~.driver.Accumulator`,
  :func:`~.driver.run_pass`) and the batch stream it feeds;
* :mod:`.execution`: :class:`~.execution.Execution`, the run settings of every entry point;
* :mod:`.data`: user data (dicts, ``datasets.Dataset``, lists, callables) as fixed-size
  padded batches;
* :mod:`.mesh`: device meshes and data-parallel placement;
* :mod:`.checkpoint`: atomic two-generation snapshots and the data chain;
* :mod:`.io`: atomic, checksummed, self-describing files; the one digest and atomic writer;
* :mod:`.hosts`: several hosts: data shards and exact merges of their parts.
"""

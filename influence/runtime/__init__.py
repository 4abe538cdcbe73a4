"""Runtime: what every streamed pass needs, whatever it computes.

* :mod:`.data`: user data (dicts, ``datasets.Dataset``, lists, callables) as fixed-size
  padded batches;
* :mod:`.stream`: the resumable pass driver;
* :mod:`.mesh`: device meshes and data-parallel placement;
* :mod:`.checkpoint`: atomic two-generation snapshots and the data chain;
* :mod:`.io`: atomic, checksummed, self-describing files;
* :mod:`.hosts`: several hosts: data shards and exact merges of their parts.
"""

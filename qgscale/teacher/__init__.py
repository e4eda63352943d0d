"""The query-generator teacher on Ray actors: scoring (``scoring``) and generation
(``generation``) over shards, as shard jobs of :func:`qgscale.runtime.run_shards`."""

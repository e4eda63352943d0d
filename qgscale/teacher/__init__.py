"""The query-generator teacher on Ray actors: scoring (``scoring``) and generation
(``generation``) over shards, on the explicit actor pool of ``pool``."""

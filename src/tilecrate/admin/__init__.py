"""The Administrator Directory's state and the site's security: settings in LMDB, users, roles,
password hashes and signed tokens. Knows nothing about HTTP (tilecrate.server.admin and
tilecrate.server.auth answer the requests)."""

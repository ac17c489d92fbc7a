"""File names inside a pool directory (kept apart so light callers need not import the pool)."""

CONFIG_NAME = "pool.json"     # what makes a directory a pool: where its data and metadata are
NAMES_NAME = "names.json"     # the names registry

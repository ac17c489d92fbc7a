"""Offline and live metadata maintenance: check, repair, dump/restore, trim, size estimates."""

"""Snapshot-aware accounting: deltas between devices, exclusive and shared space."""

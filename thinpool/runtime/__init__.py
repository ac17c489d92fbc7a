"""The container runtime backend: containerd's snapshotter model over a pool (see snapshotter.py)."""

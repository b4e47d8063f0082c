"""Data: shard writing, the streaming pipeline and transforms."""

"""Layer 3: per-shard queues in shared memory (see DESIGN.md)."""

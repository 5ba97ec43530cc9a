"""Layer 3: the broker -- channels, per-shard FIFO queues of keys, lifetimes of sent objects."""

"""Pure routing: shard placement, replica balancing, target computation."""

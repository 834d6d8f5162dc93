"""What changes over time: the rollout controller, the guard, shadow statistics, counter sync,
the runtime snapshot, the pair log, the store snapshot file and the status document."""

"""The toy world: procedural shape scenes, toy-clip and toy-sd trained on them, so effects are measurable on a CPU."""

"""The simulator: the engine's scheduler, memory accounting and remapping controller, unchanged, with
a cost model of a hardware profile in place of the model (see `executor.SimExecutor`)."""

"""The adaptune runner: Hydra app, shared training loop, checkpoints, loggers, reports."""

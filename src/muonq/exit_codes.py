"""Exit codes of a training run, shared by the entry point, the trainer and the tests."""

EXIT_BAD_INPUT = 2  # config, data, device, environment or checkpoint problems found before training
EXIT_NONFINITE = 3  # recipe.training_params.nonfinite=stop|abort met a NaN/Inf
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint was saved; rerun with resume=true (EX_TEMPFAIL)

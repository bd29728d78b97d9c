"""Training machinery: the loop and its state, pretraining, checkpoints, executors (serial, MPI)."""

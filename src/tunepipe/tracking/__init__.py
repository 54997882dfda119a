"""Tracking: one MLflow run per pipeline execution, joined by every stage.

Entry point `tracker.Tracker`: the train stage starts the run and records its id beside its output
(`write_run_record`); evaluate and merge join it (`join_train_run`). `tags` derives the git commit,
DVC experiment and data fingerprint tags; `callback` logs the Trainer's per-step figures. Imports
only the core modules (config, layout, io_utils): train, evaluate and export use it, never the reverse.
"""

"""A run, as the commands see it: the checks and records of a start (`guards`), its data (`data`, `preflight`),
and opening a finished run (`loaded`, `summary`).

The layer sits above the core (config, data, models, training, checkpointing, distributed, tracking, evaluation) and
below the commands; the core never imports it (tests/test_architecture.py). The names of a run folder's files are
on the ground floor, in `pipeline.run_folder` (`RunFolder`), where the core may use them too.
"""

"""A run, as the commands see it: its folder (`RunFolder`: the name of every file in it), the checks and records of
a start (`guards`), its data (`data`, `preflight`), and opening a finished run (`loaded`, `summary`).

The layer sits above the core (config, data, models, training, checkpointing, distributed, tracking, evaluation) and
below the commands. One module is on the ground floor: `pipeline.run.folder` imports nothing from the package, so
the core may use it for a file name (the trainer's preemption marker, the checkpointer's config.yaml); the core
imports no other module of this layer (tests/test_architecture.py). This file imports nothing, so that importing
`pipeline.run.folder` loads nothing else.
"""

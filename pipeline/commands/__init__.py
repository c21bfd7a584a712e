"""The command layer: one module per `pipeline` command, above the core library; `cli` is the dispatcher."""

"""The offline data tools of `pipeline data` that only a command uses: verify shards, build their index file."""

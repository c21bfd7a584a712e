"""The offline data tools of `pipeline data`: write shards, verify them, the digits demo data, subsets."""

"""Transport: open a shard's bytes wherever it lives (local, HTTP, object stores, pipes), the local cache of remote
shards, and the tar reader over those bytes. Knows nothing of datasets, samples or the stream."""

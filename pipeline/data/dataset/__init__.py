"""What the shards are: the manifest (splits, classes, shards), shard specs (folders, URLs, brace patterns), the shard
index (each sample's place and label), the sample keys, and the resolver that turns a `data:` config into them.
Built on `pipeline.data.io`; knows nothing of sample decoding or the stream."""

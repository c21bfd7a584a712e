"""The shard writer: image folders and CSVs in (sources), stratified splits (stratify), tar shards and the manifest
out (shards); also digits export and chosen-sample subsets. Uses `pipeline.data.io` and `pipeline.data.dataset`
(and checks images as the loader will, with `pipeline.data.samples.images`); the reader never imports it."""

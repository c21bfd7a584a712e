"""Sample processing: checking a sample and counting the bad ones (faults), decoding and converting images, the
augmentations, and the shared-memory batches the workers hand over. Built on `pipeline.data.dataset` and
`pipeline.data.io`; knows nothing of the stream's order or position."""

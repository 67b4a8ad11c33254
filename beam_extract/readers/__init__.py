"""Reading an output directory outside the pipeline: `reader` (records, token batches, tf.data) and
`mixing` (shuffled token batches across shards). No Beam or JAX, as `beam_extract.format`; the
consumers in `beam_extract.integrations` build on these."""

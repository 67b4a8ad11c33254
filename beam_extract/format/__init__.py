"""The record format and the output's layout on storage, readable without Beam, JAX or TensorFlow
(tests/test_structure.py keeps it so: nothing here imports them, nor imports a module that does).

- `schema`, `wire`, `example_proto`, `tfrecord`: a record's features, their encoding, the framing.
- `storage`: reading (and small whole-file writes of) local or gs:// files without Beam.
- `layout`: the names readers look for in an output directory, and the manifest.
- `commits`: the commit store's read side: which files hold finished work, which samples they hold.
"""

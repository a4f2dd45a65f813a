"""The data layer: raw ImageNet layouts -> Parquet shards -> Ray Data training batches.

Modules (see docs/data.md): `options` (the allowed values, defined once),
`storage` (local folders and s3:// on pyarrow.fs), `checks` (bad paths and
credentials, one-line errors), `readers`/`formats` (raw layouts), `ingest`,
`synthetic`/`demo` (generated data), `meta`, `transforms` (augmentation
maths), `epochs` (the epoch plan), `decode` (one decode task), `pipeline`
(Ray Data epoch datasets). Nothing is imported here,
so `service.config` can read `options` without pulling in pyarrow or Ray.
"""

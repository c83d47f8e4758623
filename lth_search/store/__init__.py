"""The content-addressed stage store: keys, byte formats, entries, filesystems, leases, records.

Stages are safetensors + bit-packed Parquet + JSON manifests on any pyarrow/fsspec
filesystem; nothing is ever unpickled from it.
"""

"""The Dagster layer: thin glue mapping partitions to data-layer and training-core calls."""

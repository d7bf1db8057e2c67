"""The Ray programs of the pipeline stages."""

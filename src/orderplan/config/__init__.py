"""Run configuration: the schemas every job shares (run fields, the backbone group), Hydra
composition of the packaged YAML presets, and path resolution against the package's artifacts."""

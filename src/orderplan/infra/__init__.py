"""Infrastructure every room may use: atomic checkpoints, the torchrun process group, named random
streams, console logs and metric loggers, config value checks, and artifact checksums."""

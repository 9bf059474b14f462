"""Data: the embedded MNIST digits, ImageNet-style folders, pre-extracted VQ codes, and synthetic
code grids for smoke runs."""

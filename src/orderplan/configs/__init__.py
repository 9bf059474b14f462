"""The YAML presets of the jobs (package data). A package so that Hydra finds them as
`pkg://orderplan.configs` from an installed copy; the defaults themselves live in the schemas."""

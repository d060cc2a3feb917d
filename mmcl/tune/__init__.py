"""Ray Tune for mmcl: YAML search spaces (`space`), sweeps (`sweep`), TupleInfoNCE's sample
optimization (`sample_opt`), the trial that launches one Ray Train run (`trial`), and what
`mmcl tune` runs once mmcl/cli.py has parsed it (`cli`). Ray is imported on use, so this
package imports fast."""

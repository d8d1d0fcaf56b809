"""The `fcn` commands that are not DVC stages, each a thin main(argv)."""

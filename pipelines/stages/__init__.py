"""The DVC stages (dvc.yaml), each a thin main(argv): fetch, preprocess, train, evaluate, register."""

"""Stage entry points (run_*), one module per stage: what medtransfer <stage>, dvc.yaml and the Prefect flow call. Each chains the domain packages and writes its report."""

"""medtransfer stages, one module each, plus the domain code they share.

Pure logic here imports neither Prefect nor MLflow; the stage functions take and return plain
typed values so that the Prefect flow, ``dvc.yaml`` and the tests call the same code.
"""

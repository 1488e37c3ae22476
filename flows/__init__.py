"""Prefect flows and the ``medtransfer`` command line."""

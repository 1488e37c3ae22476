"""Prefect flows and the ``medtransfer`` command line."""

from flows.environment import apply_process_defaults

# Before any flow module imports prefect, which reads its settings once (see flows.environment).
apply_process_defaults()

"""MLflow, and nothing else of the project talks to it: the store and experiment
(:mod:`~tasks.tracking.configure`), how a run ends honestly (:mod:`~tasks.tracking.runs`), the
training loop's MLflow recorder (:mod:`~tasks.tracking.recorder`), the train stage's runs
(:mod:`~tasks.tracking.train_run`) and the MLflow half of resuming (:mod:`~tasks.tracking.resume`).

A run ends ``FINISHED`` only when its work is done: an exception ends it ``FAILED``, Ctrl-C or
SIGTERM ``KILLED`` (:func:`tasks.tracking.runs.ended_honestly`,
:func:`tasks.signals.sigterm_raises`). SIGKILL leaves it ``RUNNING``; the train stage closes
such a stale run the next time it trains the same configuration.

Embedded default: a SQLite store (``mlflow.db``) and a local artifact folder (``mlartifacts/``)
inside the project, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows every run.
A tracking server is configuration: set ``mlflow.tracking_uri`` (or ``MLFLOW_TRACKING_URI``).
"""

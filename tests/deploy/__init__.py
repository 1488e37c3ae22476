"""Registry, packaging and serving tests (real MLflow store, real `bentoml serve`)."""

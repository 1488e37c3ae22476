"""The MLflow registry and the Bento: promotion decisions, registry operations, model cards, packaging."""

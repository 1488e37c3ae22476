"""The BentoML service of medtransfer (``serving/service.py``) and its ``bentofile.yaml``."""

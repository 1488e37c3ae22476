"""The Bento's arguments: what ``medtransfer package`` writes (``bentoml build --arg``) and
:mod:`serving.service` reads with ``bentoml.use_arguments``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ServingArgs(BaseModel):
    """The Bento's arguments (``bentoml build --arg``; set by ``medtransfer package``)."""

    model_config = ConfigDict(protected_namespaces=(), extra="forbid")

    model_tag: str
    model_name: str = "medtransfer-student"
    model_version: str = ""
    dataset_version: str = ""
    classes: list[str]
    image_size: int
    # The model's input channels: 1 gray, 3 colour (the upload rule in tasks.model.inference).
    channels: int = 1
    threshold: float | None = None
    max_upload_bytes: int = 64 * 1024 * 1024
    max_batch_files: int = 64
    max_image_dim: int = 8192
    max_decoded_mib: int = 128
    max_concurrent_decodes: int = 1
    request_timeout_s: float = 60.0
    batching: bool = True
    max_batch_size: int = 8
    max_latency_ms: int = 5000
    model_threads: int = 1
    # The training data's rule for multi-frame files (data.multiframe), and its header values.
    multiframe: str | None = None
    scope: dict[str, list[str]] | None = None
    ood_threshold: float | None = None
    ood_gate: bool = True
    coverage: float | None = None  # serving.coverage; None (and no quantile): no sets
    conformal_threshold: float | None = None  # the set rule's quantile, set at packaging
    monitor_store: str = ""
    monitor_max_records: int = 10000
    # serving.pacs as packaged (enabled, host, port, called_ae, calling_ae, timeout_s).
    pacs: dict | None = None
    # Whether the registry version carries the alias (passed its gates), and that in words:
    # /info and every reply repeat it. None: a Bento built before it was recorded.
    approved: bool | None = None
    approval: str = ""
    # single-label, or multi-label: ``classes`` are findings, each decided against its own
    # threshold in ``thresholds`` (tasks.model.findings); no prediction sets then.
    label_kind: str = "single-label"
    thresholds: list[float] | None = None

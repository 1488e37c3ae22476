"""The one configuration: ``params.yaml`` read into a typed :class:`Params`.

``load_params`` reads the YAML file, applies ``-S key=value`` overrides (spelled as for
``dvc exp run -S``: a dotted key, ``=``, a YAML value, so ``train.compare=[full,scratch]`` is a
list) and parses the result into frozen dataclasses, one per section. Every section is checked
the same way (:mod:`tasks.config_checks`): an unknown key, a missing key or a value of the
wrong type or range is one :class:`~tasks.errors.MedtransferError` line naming the key and
what is allowed.

Defaults live in one place, the shipped ``params.yaml``: the dataclasses have none, so every
key must be present (a test checks that the file and the dataclasses agree).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config_checks import build_checked, rule
from tasks.config_file import apply_overrides, read_params_file
from tasks.errors import MedtransferError

DEFAULT_PARAMS_FILE = Path("params.yaml")

STRATEGIES = ("linear_probe", "partial", "full", "scratch", "lp_ft")
THRESHOLD_RULES = ("youden", "spec@0.9", "0.5")
CALIBRATIONS = ("temperature", "none")
TASK_RUNNERS = ("threads", "processes", "dask")
MULTIFRAME_MODES = ("middle", "all")
# The grouping attributes evaluation can break figures down by (tasks/data/groups.py)
GROUP_ATTRIBUTES = ("manufacturer", "model", "view", "body_part", "site", "sex", "age_band")
# data.channels: auto keeps colour when the source is colour; gray makes every image luma (the
# behaviour before colour existed); rgb demands a colour source (tasks/data/channels.py).
CHANNEL_MODES = ("auto", "gray", "rgb")
# data.uncertain: what a CheXpert-style uncertain (-1) finding cell becomes: unknown (left out
# of that finding's loss and figures), absent or present (tasks/data/findings.py).
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
# Out-of-distribution scores on the student's features (tasks/model/profile.py).
OOD_METHODS = ("knn", "mahalanobis", "energy")
# Every teacher downsamples by 32 (tasks.model.teachers.TeacherSpec.size_multiple and
# min_image_size): another size either fails inside the network or silently pads its stride-2
# layers unlike the weights were trained. The ceiling keeps one image at 1 MB and a batch in
# memory; the teachers were trained at 224-260 px, so nothing is gained far above it.
IMAGE_SIZE_STEP = 32
MAX_IMAGE_SIZE = 1024


# A DICOM AE title (PS3.5 AE): up to 16 characters of the default repertoire, no backslash,
# not only spaces.
AE_TITLE = re.compile(r"(?=.*[^ ])[\x20-\x5b\x5d-\x7e]{1,16}")

# data.name: a label, never a path (it names runs and the model card)
DATA_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


# ---------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataParams:
    """``data``: where the images come from and how they are stored."""

    source: str
    labels_csv: str | None
    # multi-label findings from labels_csv: one 0/1/-1/blank column per finding (CheXpert),
    # or one column of |-joined names (ChestX-ray14); null/null: one label per file
    findings: tuple[str, ...] | None
    findings_column: str | None
    uncertain: str = rule(choices=UNCERTAIN_POLICIES)
    # a regular expression with one group, searched in each labels-CSV path: the group is the
    # file's patient when the CSV has no patient column (CheXpert: patient(\d+)/)
    patient_from_path: str | None
    name: str | None
    # the site's label (a grouping attribute of every image), same form as name
    site: str | None
    processed_dir: str
    image_size: int = rule(min=IMAGE_SIZE_STEP, max=MAX_IMAGE_SIZE, multiple_of=IMAGE_SIZE_STEP)
    multiframe: str = rule(choices=MULTIFRAME_MODES)
    channels: str = rule(choices=CHANNEL_MODES)
    val_fraction: float = rule(min=0.0, max=0.9)
    test_fraction: float = rule(min=0.0, max=0.9)
    workers: int = rule(min=0)

    def check(self) -> None:
        if self.name is not None and not DATA_NAME.fullmatch(self.name):
            raise MedtransferError(
                f"data.name {self.name!r} must be 1 to 64 letters, digits, '.', '_' or '-' "
                "(a label such as site-a-2024, not a path), or null."
            )
        if self.site is not None and not DATA_NAME.fullmatch(self.site):
            raise MedtransferError(
                f"data.site {self.site!r} must be 1 to 64 letters, digits, '.', '_' or '-' "
                "(a label such as hospital-north, not a path), or null."
            )
        self._check_findings()
        self._check_patient_from_path()
        if self.val_fraction + self.test_fraction >= 1:
            raise MedtransferError(
                "data.val_fraction and data.test_fraction must sum to less than 1, not "
                f"{self.val_fraction} + {self.test_fraction}."
            )

    def _check_findings(self) -> None:
        """Findings come from one layout of a labels CSV: not both keys, not without a CSV,
        no finding column named twice or empty."""
        if self.findings is not None and self.findings_column is not None:
            raise MedtransferError(
                "data.findings (one column per finding) and data.findings_column (one column of "
                "|-joined findings) name two layouts; set one of them and the other to null."
            )
        if (self.findings is not None or self.findings_column is not None) and not self.labels_csv:
            raise MedtransferError(
                "data.findings and data.findings_column read the labels CSV; set "
                "data.labels_csv to the CSV that holds the findings."
            )
        if self.findings is not None and (
            len(self.findings) < 1
            or len(set(self.findings)) != len(self.findings)
            or not all(name.strip() for name in self.findings)
        ):
            raise MedtransferError(
                "data.findings must list the CSV's finding columns, each once and non-empty "
                "(e.g. [Atelectasis, Edema]), or be null."
            )
        if self.findings_column is not None and not self.findings_column.strip():
            raise MedtransferError(
                "data.findings_column must name the CSV's column of findings "
                "(e.g. 'Finding Labels') or be null."
            )

    def _check_patient_from_path(self) -> None:
        """A patient pattern is a valid regular expression with exactly one group, read from
        the labels CSV's paths (so it needs one)."""
        pattern = self.patient_from_path
        if pattern is None:
            return
        if not self.labels_csv:
            raise MedtransferError(
                "data.patient_from_path reads the labels CSV's paths; set data.labels_csv too, "
                "or data.patient_from_path to null."
            )
        try:
            groups = re.compile(pattern).groups
        except re.error as err:
            raise MedtransferError(
                f"data.patient_from_path {pattern!r} is not a regular expression ({err}); "
                r"write one with one group, e.g. 'patient(\d+)/'."
            ) from None
        if groups != 1:
            raise MedtransferError(
                f"data.patient_from_path {pattern!r} has {groups} groups; it needs exactly one, "
                r"the patient (e.g. 'patient(\d+)/')."
            )

    @property
    def multilabel(self) -> bool:
        """Whether the labels CSV gives several findings per file (either layout)."""
        return self.findings is not None or self.findings_column is not None

    @property
    def worker_count(self) -> int:
        """Decoding workers: ``workers``, or one per CPU core when it is 0."""
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class SyntheticParams:
    """``synthetic``: the built-in generator of DICOM chest-like scenes."""

    output_dir: str
    n_patients: int = rule(min=2)
    images_per_patient_min: int = rule(min=1)
    images_per_patient_max: int = rule(min=1)
    size: int = rule(min=32, max=4096)
    positive_fraction: float = rule(above=0.0, max=1.0)
    lesion_contrast: float = rule(min=0.0, max=1.0)
    rle_fraction: float = rule(min=0.0, max=1.0)
    monochrome1_fraction: float = rule(min=0.0, max=1.0)
    multiframe_fraction: float = rule(min=0.0, max=1.0)
    second_scanner_contrast: float = rule(min=0.0, max=1.0)

    def check(self) -> None:
        if self.images_per_patient_min > self.images_per_patient_max:
            raise MedtransferError(
                "synthetic.images_per_patient_min must not exceed images_per_patient_max."
            )


@dataclass(frozen=True)
class AugmentParams:
    """``train.augment``: augmentation strengths; zero disables a transform."""

    flip: bool
    rotate_degrees: float = rule(min=0.0, max=180.0)
    scale: float = rule(min=0.0, max=0.9)
    translate: float = rule(min=0.0, max=0.5)
    contrast_gamma: float = rule(min=0.0, max=0.9)
    noise_std: float = rule(min=0.0, max=1.0)
    # colour images only (gray sets never get it): brightness and saturation scale drawn
    # from [1 - x, 1 + x] per image, and a per-channel gain from [1 - x/2, 1 + x/2]
    colour_jitter: float = rule(min=0.0, max=0.9)


@dataclass(frozen=True)
class TrainParams:
    """``train``: the teacher, the transfer strategy and the loop."""

    teacher: str
    weights_path: str | None
    # auto: chosen by the evidence step (tasks/transfer/selection.py) before training
    strategy: str = rule(choices=(*STRATEGIES, "auto"))
    unfreeze_blocks: int = rule(min=0)
    compare: tuple[str, ...] | None = rule()
    # auto: the pilots' time budget (tasks/transfer/pilots.py)
    auto_budget_minutes: float = rule(above=0.0)
    label_fractions: tuple[float, ...] | None = rule(above=0.0, max=1.0)
    epochs: int = rule(min=1)
    # a budget of optimizer steps: the epochs are cut to the fewest whole ones that reach it
    # (tasks/training/schedule.py); null: train.epochs alone
    max_steps: int | None = rule(min=1)
    batch_size: int = rule(min=1)
    lr: float = rule(above=0.0)
    backbone_lr_factor: float = rule(above=0.0, max=1.0)
    weight_decay: float = rule(min=0.0)
    warmup_epochs: float = rule(min=0.0)
    patience: int = rule(min=1)
    dropout: float = rule(min=0.0, max=0.99)
    class_weighting: str = rule(choices=("balanced", "none"))
    num_workers: int = rule(min=0)
    device: str = rule()
    amp: bool = rule()
    channels_last: bool = rule()
    adversarial: str = rule(choices=("none", "pgd"))
    adversarial_eps_255: float = rule(above=0.0)
    adversarial_steps: int = rule(min=1)
    model_dir: str = rule()
    checkpoint_dir: str = rule()
    augment: AugmentParams = rule()

    def check(self) -> None:
        for fraction in self.label_fractions or ():
            if not 0 < fraction <= 1:
                raise MedtransferError(f"train.label_fractions must lie in (0, 1], not {fraction}.")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise MedtransferError(
                f"train.device must be auto, cpu, cuda or cuda:N, not {self.device!r}."
            )


@dataclass(frozen=True)
class EvalParams:
    """``eval``: the decision threshold rule, the Grad-CAM grid, calibration and intervals."""

    threshold: str = rule(choices=THRESHOLD_RULES)
    gradcam_examples: int = rule(min=0)
    calibration: str = rule(choices=CALIBRATIONS)
    bootstrap: int = rule(min=100)
    groups: tuple[str, ...] = rule(choices=GROUP_ATTRIBUTES)
    min_group_size: int = rule(min=1)


@dataclass(frozen=True)
class MlflowParams:
    """``mlflow``: the tracking store and experiment (``MLFLOW_TRACKING_URI`` wins)."""

    tracking_uri: str
    artifact_root: str
    experiment: str


@dataclass(frozen=True)
class OrchestrationParams:
    """``orchestration``: the flow's task runner and the deployments' schedules."""

    task_runner: str = rule(choices=TASK_RUNNERS)
    dask_address: str | None = rule()
    retrain_cron: str | None = rule()
    watch_cron: str | None = rule()
    timezone: str = rule()
    watch_folder: str | None = rule()
    state_file: str | None = rule()


@dataclass(frozen=True)
class RobustnessParams:
    """``robustness``: the attacks (budgets in 1/255 pixel units)."""

    max_samples: int | None = rule(min=1)
    epsilons_255: tuple[float, ...] = rule(min=0.0, max=255.0)
    pgd_steps: int = rule(min=1)
    pgd_step_fraction: float | None = rule(above=0.0)
    apgd_steps: int = rule(min=1)
    universal_images: int = rule(min=1)
    universal_steps: int = rule(min=1)
    batch_size: int = rule(min=1)
    reference_probe: bool = rule()
    reference_probe_steps: int = rule(min=1)
    square_max_samples: int = rule(min=0)
    square_queries: int = rule(min=1)

    @property
    def epsilons(self) -> tuple[float, ...]:
        """Budgets in pixel units ([0, 1] scale), budget 0 first as the clean reference."""
        return (0.0, *sorted(e / 255.0 for e in self.epsilons_255 if e > 0))


@dataclass(frozen=True)
class GatesParams:
    """``gates``: the promotion gates (null disables one); budgets in 1/255 units."""

    # Above 1 blocks every model (a way to hold promotion).
    min_clean_auc: float | None = rule(min=0.0)
    min_worst_group_auc: float | None = rule(min=0.0)
    min_robust_acc: float | None = rule(min=0.0)
    robust_acc_eps_255: float | None = rule(above=0.0)
    max_teacher_transfer_success: float | None = rule(min=0.0, max=1.0)
    teacher_transfer_eps_255: float | None = rule(above=0.0)
    max_universal_fooling: float | None = rule(min=0.0, max=1.0)
    universal_eps_255: float | None = rule(above=0.0)
    max_square_success: float | None = rule(min=0.0, max=1.0)
    square_eps_255: float | None = rule(above=0.0)

    def in_pixels(self) -> dict[str, float | None]:
        """The gates with ``*_eps_255`` budgets converted to pixel units (``*_eps``)."""
        converted: dict[str, float | None] = {}
        for key, value in dataclasses.asdict(self).items():
            if key.endswith("_eps_255"):
                converted[key.removesuffix("_255")] = None if value is None else value / 255.0
            else:
                converted[key] = value
        return converted


@dataclass(frozen=True)
class RegistryParams:
    """``registry``: the registered model, its promotion alias, the version to package."""

    model_name: str
    alias: str
    version: int | None = rule(min=1)


@dataclass(frozen=True)
class PacsParams:
    """``serving.pacs``: where the service C-STOREs each classified DICOM's SR and Grad-CAM
    capture (``serving/pacs.py``); off unless ``enabled``."""

    enabled: bool = rule()
    host: str = rule()
    port: int = rule(min=1, max=65535)
    # DICOM AE titles: 1-16 characters, no backslash (checked below).
    called_ae: str = rule()
    calling_ae: str = rule()
    timeout_s: float = rule(above=0.0)

    def __post_init__(self) -> None:
        for key in ("called_ae", "calling_ae"):
            value = getattr(self, key)
            if not AE_TITLE.fullmatch(value):
                raise MedtransferError(
                    f"serving.pacs.{key} must be a DICOM AE title: 1 to 16 characters, no "
                    "backslash or control character, not all spaces."
                )
        if self.enabled and not self.host.strip():
            raise MedtransferError(
                "serving.pacs.host must name the PACS when serving.pacs.enabled is true."
            )


@dataclass(frozen=True)
class ServingParams:
    """``serving``: the Bento's name, store and the service's limits and batching."""

    bento_name: str
    bentoml_home: str
    export_dir: str
    max_upload_bytes: int = rule(min=1)
    max_batch_files: int = rule(min=1)
    max_image_dim: int = rule(min=1)
    max_decoded_mib: int = rule(min=1)
    max_concurrent_decodes: int = rule(min=1)
    request_timeout_s: float = rule(above=0.0)
    batching: bool = rule()
    # BentoML's minimum; turn batching off with serving.batching=false instead.
    max_batch_size: int = rule(min=2)
    max_latency_ms: int = rule(min=1)
    model_threads: int = rule(min=0)
    ood_method: str = rule(choices=OOD_METHODS)
    ood_false_rejection: float = rule(above=0.0, max=0.5)
    ood_gate: bool = rule()
    monitor_store: str = rule()
    monitor_max_records: int = rule(min=1)
    coverage: float = rule(above=0.0, max=0.999)
    pacs: PacsParams = rule()


@dataclass(frozen=True)
class MonitorParams:
    """``monitor``: drift of the served requests against the training profile."""

    window: int = rule(min=10)
    min_requests: int = rule(min=1)
    psi_max: float = rule(above=0.0)
    abstention_max: float = rule(min=0.0, max=1.0)
    cron: str | None = rule()


@dataclass(frozen=True)
class Params:
    """The whole of ``params.yaml``."""

    # numpy's and torch's generators take seeds in [0, 2**32); a larger one used to pass here
    # and fail training with a traceback
    seed: int = rule(min=0, max=2**32 - 1)
    reports_dir: str = rule()
    data: DataParams = rule()
    synthetic: SyntheticParams = rule()
    train: TrainParams = rule()
    eval: EvalParams = rule()
    mlflow: MlflowParams = rule()
    orchestration: OrchestrationParams = rule()
    robustness: RobustnessParams = rule()
    gates: GatesParams = rule()
    registry: RegistryParams = rule()
    serving: ServingParams = rule()
    monitor: MonitorParams = rule()

    def to_dict(self) -> dict[str, Any]:
        """The parameters as plain YAML-ready values (tuples as lists), for dumping a params
        file, logging to MLflow or hashing."""
        return _plain(dataclasses.asdict(self))

    def with_overrides(self, overrides: Iterable[str]) -> Params:
        """A copy with each ``dotted.key=yaml_value`` override applied and checked."""
        return parse_params(apply_overrides(self.to_dict(), overrides))


# ---------------------------------------------------------------------------------- loading


def load_params(path: str | Path = DEFAULT_PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    """Read a params file, apply overrides and check every value.

    Args:
        path: the YAML file, ``params.yaml`` in the working directory by default.
        overrides: ``key=value`` strings applied in order.

    Returns:
        The typed parameters.

    Raises:
        MedtransferError: a missing or unreadable file, invalid YAML, an unknown key, a missing
            key, or a value of the wrong type or range; one line naming the key.
    """
    return parse_params(apply_overrides(read_params_file(path), overrides))


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Check a raw parameter mapping and build :class:`Params` from it."""
    return build_checked(Params, raw, "")


# MLflow's limit on one parameter value: flat values are cut to it, for MLflow's params and the
# checkpoint key alike (tasks/training/resume.py).
MAX_PARAM_LENGTH = 6000


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}``, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value

"""params.yaml loading, -S overrides, and the typed configuration's checks."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from tasks.config import Params, load_params, parse_params
from tasks.config_file import apply_overrides
from tasks.errors import MedtransferError
from tests.conftest import REPO


def test_overrides_parse_yaml_values() -> None:
    params = {"data": {"image_size": 128, "source": "synthetic"}, "train": {"compare": None}}
    out = apply_overrides(
        params, ["data.image_size=160", "train.compare=[full,scratch]", "data.source=/x/y"]
    )
    assert out["data"]["image_size"] == 160
    assert out["train"]["compare"] == ["full", "scratch"]
    assert out["data"]["source"] == "/x/y"
    assert params["data"]["image_size"] == 128  # the input is not modified


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.imagesize=3", "Unknown parameter"),
        ("nosection.x=1", "Unknown parameter section"),
        ("data", "key=value"),
    ],
)
def test_bad_overrides_fail_loudly(override: str, message: str) -> None:
    with pytest.raises(MedtransferError, match=message):
        apply_overrides({"data": {"image_size": 1}}, [override])


def test_repository_params_load_as_typed_sections() -> None:
    params = load_params(REPO / "params.yaml")
    # the synthesize stage's folder, a path DVC can depend on
    assert params.data.source == f"{params.synthetic.output_dir}/dicom"
    assert params.train.augment.flip is True
    assert params.robustness.epsilons_255 == (0.5, 1.0, 2.0, 4.0, 8.0)
    assert params.gates.in_pixels()["teacher_transfer_eps"] == pytest.approx(1 / 255)


def _keys(cls: type, prefix: str = "") -> set[str]:
    found = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            found |= _keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            found.add(f"{prefix}{field.name}")
    return found


def _yaml_keys(node: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in node.items():
        if isinstance(value, dict):
            found |= _yaml_keys(value, f"{prefix}{key}.")
        else:
            found.add(f"{prefix}{key}")
    return found


def test_the_shipped_params_yaml_and_the_dataclasses_have_the_same_keys_and_no_defaults() -> None:
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    assert _yaml_keys(shipped) == _keys(Params)

    def defaults(cls: type) -> list[str]:
        found = []
        for field in dataclasses.fields(cls):
            if (
                field.default is not dataclasses.MISSING
                or field.default_factory is not dataclasses.MISSING
            ):
                found.append(f"{cls.__name__}.{field.name}")
            hint = typing.get_type_hints(cls)[field.name]
            if dataclasses.is_dataclass(hint):
                found += defaults(hint)
        return found

    assert defaults(Params) == []  # defaults live in params.yaml alone


def test_the_typed_params_round_trip_through_a_params_file() -> None:
    params = load_params(REPO / "params.yaml")
    assert parse_params(yaml.safe_load(yaml.safe_dump(params.to_dict()))) == params


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.image_size=abc", "data.image_size must be an integer, not 'abc'"),
        ("data.val_fraction=abc", "data.val_fraction must be a number, not 'abc'"),
        ("seed=abc", "seed must be an integer, not 'abc'"),
        ("data=5", "data must be a mapping of keys, not 5"),
        ("data.workers=-1", "data.workers must be at least 0, not -1"),
        ("synthetic.n_patients=abc", "synthetic.n_patients must be an integer"),
        ("synthetic.size=0", "synthetic.size must be at least 32, not 0"),
        ("train.epochs=abc", "train.epochs must be an integer"),
        ("train.epochs=0", "train.epochs must be at least 1, not 0"),
        ("train.lr=abc", "train.lr must be a number"),
        ("train.batch_size=0", "train.batch_size must be at least 1"),
        ("train.amp=yes please", "train.amp must be true or false"),
        ("train.strategy=deep", "train.strategy must be one of"),
        ("train.device=tpu", "train.device must be auto, cpu, cuda or cuda:N"),
        ("train.device=cudax", "train.device must be auto, cpu, cuda or cuda:N"),
        ("train.augment.flip=3", "train.augment.flip must be true or false"),
        ("data.image_size=100000", "data.image_size must be at most 1024"),
        ("data.image_size=100", r"data.image_size must be a multiple of 32, not 100 \(nearest: 96"),
        ("data.image_size=16", "data.image_size must be at least 32"),
        ("eval.threshold=best", "eval.threshold must be one of"),
        ("registry.version=abc", "registry.version must be an integer"),
        (
            "gates.max_teacher_transfer_success=2",
            "gates.max_teacher_transfer_success must be at most 1.0",
        ),
        ("serving.max_batch_size=1", "serving.max_batch_size must be at least 2"),
        ("serving.max_decoded_mib=0", "serving.max_decoded_mib must be at least 1"),
        ("serving.max_concurrent_decodes=0", "serving.max_concurrent_decodes must be at least 1"),
        ("serving.request_timeout_s=0", "serving.request_timeout_s must be greater than 0"),
        ("orchestration.task_runner=spark", "orchestration.task_runner must be one of"),
        ("robustness.epsilons_255=[1,x]", "robustness.epsilons_255 must be a number, not .x."),
        ("data.val_fraction=0.9", "must sum to less than 1"),
        ("seed=12345678901234567890123456", "seed must be at most 4294967295"),
        ("seed=4294967296", "seed must be at most 4294967295"),
        ("train.label_fractions=[0.5,2]", "train.label_fractions must be at most 1.0"),
        ("serving.pacs.called_ae=ABCDEFGHIJKLMNOPQ", "serving.pacs.called_ae must be a DICOM AE"),
        ("serving.pacs.calling_ae='A\\B'", "serving.pacs.calling_ae must be a DICOM AE"),
        ("serving.pacs.calling_ae='  '", "serving.pacs.calling_ae must be a DICOM AE"),
        ("serving.pacs.enabled=true", "serving.pacs.host must name the PACS"),
        ("serving.pacs.port=70000", "serving.pacs.port must be at most 65535"),
    ],
)
def test_every_bad_value_is_one_clear_line_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(MedtransferError, match=message) as raised:
        load_params(REPO / "params.yaml", [override])
    assert "\n" not in str(raised.value)


def test_unknown_and_missing_keys_in_a_params_file_are_named(tmp_path) -> None:
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    # Sections the old loaders read as raw dicts ignored a typo silently.
    shipped["orchestration"]["watch_foldr"] = "/incoming"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(shipped))
    with pytest.raises(MedtransferError, match=r"Unknown key 'orchestration.watch_foldr'"):
        load_params(tmp_path / "typo.yaml")
    del shipped["orchestration"]["watch_foldr"], shipped["eval"]["threshold"]
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(shipped))
    with pytest.raises(MedtransferError, match=r"lacks 'eval.threshold'"):
        load_params(tmp_path / "missing.yaml")


def test_a_yaml_syntax_error_or_a_non_utf8_file_is_one_line(tmp_path) -> None:
    (tmp_path / "broken.yaml").write_text("data:\n  image_size: [1, 2\nseed: 3\n")
    with pytest.raises(MedtransferError, match="not valid YAML") as raised:
        load_params(tmp_path / "broken.yaml")
    assert "\n" not in str(raised.value)
    (tmp_path / "latin1.yaml").write_bytes("seed: 4\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(MedtransferError, match="not UTF-8"):
        load_params(tmp_path / "latin1.yaml")


def test_a_key_written_twice_in_a_params_file_is_refused_naming_it_and_its_line(tmp_path) -> None:
    shipped = (REPO / "params.yaml").read_text()
    lines = shipped.count("\n")
    # a forgotten second `seed:` at the end used to win silently over the first
    (tmp_path / "twice.yaml").write_text(shipped + "seed: 7\n")
    with pytest.raises(MedtransferError, match="the key 'seed' appears twice") as raised:
        load_params(tmp_path / "twice.yaml")
    assert f"at line {lines + 1}, column 1" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert load_params(REPO / "params.yaml", ["seed=4294967295"]).seed == 2**32 - 1


def test_missing_params_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(MedtransferError, match="No parameter file"):
        load_params(tmp_path / "params.yaml")


def test_every_image_size_the_configuration_accepts_suits_every_teacher() -> None:
    from tasks.config import IMAGE_SIZE_STEP, MAX_IMAGE_SIZE
    from tasks.model.student import check_image_size
    from tasks.model.teachers import known_teachers

    accepted = range(IMAGE_SIZE_STEP, MAX_IMAGE_SIZE + 1, IMAGE_SIZE_STEP)
    for teacher in known_teachers():
        for size in accepted:
            check_image_size(teacher, size)  # raises when ingest would accept a size train refuses

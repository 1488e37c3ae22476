"""Every DICOM file shipped with pydicom and pydicom-data goes through ingestion.

Each one must end in the dataset or in the quarantine report with a reason; the counts add up
and nothing crashes. The labels CSV labels every file, so every rejection is about the file.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from tasks.config import Params
from tasks.data.dicom_io import decode_file
from tasks.data.quarantine import NO_LABEL, QUARANTINE_REASONS
from tasks.stages.ingest import run_ingest


def _corpus_roots() -> dict[str, Path]:
    roots = {"pydicom": Path(pydicom.__file__).parent / "data" / "test_files"}
    spec = importlib.util.find_spec("data_store")  # the pydicom-data package
    if spec is None or spec.origin is None:
        pytest.fail("pydicom-data is not installed; `make venv` installs it with the dev extras")
    roots["pydicom-data"] = Path(spec.origin).parent / "data"
    return roots


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A copy of both corpora under one folder, plus a CSV labelling every file."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "files"
    rows = []
    for prefix, corpus_root in _corpus_roots().items():
        for path in sorted(corpus_root.rglob("*")):
            if path.is_file() and path.suffix not in {".py", ".pyc"}:
                relative = Path(prefix) / path.relative_to(corpus_root)
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, folder / relative)
                rows.append((relative.as_posix(), "a" if len(rows) % 2 else "b"))
    labels = root / "labels.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(labels, index=False)
    return folder, labels, len(rows)


def test_every_corpus_file_is_ingested_or_quarantined(
    params: Params, corpus: tuple[Path, Path, int]
) -> None:
    folder, labels, n_files = corpus
    result = run_ingest(
        params.with_overrides(
            [f"data.source={folder}", f"data.labels_csv={labels}", "data.multiframe=all"]
        ),
        progress=False,
    )
    manifest = pd.read_csv(result.processed_dir / "manifest.csv")
    quarantine = pd.read_csv(result.processed_dir / "quarantine.csv", keep_default_na=False)

    assert result.files_seen == n_files > 200
    assert result.ingested + result.quarantined == result.files_seen
    assert manifest["source_file"].nunique() == result.ingested
    assert set(manifest["source_file"]).isdisjoint(quarantine["source_file"])
    assert set(quarantine["reason"]) <= set(QUARANTINE_REASONS) - {NO_LABEL}
    assert (quarantine["detail"] != "").all()

    by_file = quarantine.set_index("source_file")["reason"]
    ingested = set(manifest["source_file"])
    # Known members of the corpus, one per decoding path.
    for name in (
        "pydicom/CT_small.dcm",  # rescale + window
        "pydicom/MR_small.dcm",
        "pydicom/SC_rgb_jpeg.dcm",  # RGB, JPEG baseline
        "pydicom/examples_palette.dcm",  # PALETTE COLOR
        "pydicom/examples_ybr_color.dcm",  # YBR, multi-frame
        "pydicom-data/emri_small.dcm",  # multi-frame
        "pydicom-data/JPEG-LL.dcm",  # JPEG lossless, pydicom-data
    ):
        assert name in ingested, name
    assert by_file["pydicom/rtplan.dcm"] == "no_pixel_data"
    assert by_file["pydicom/README.txt"] == "not_dicom"
    assert by_file["pydicom/MR_truncated.dcm"] == "decode_failed"
    assert by_file["pydicom/MR_small_RLE.dcm"] == "duplicate_sop_instance_uid"
    print(
        f"\ncorpus: seen {result.files_seen}, ingested {result.ingested}, "
        f"quarantined {result.quarantined}: "
        f"{ {k: v for k, v in result.quarantined_by_reason.items() if v} }"
    )


@pytest.mark.parametrize(
    "compressed", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(compressed: str) -> None:
    # These files hold the same image as MR_small.dcm (hence the duplicate SOPInstanceUID that
    # quarantines them during ingestion); decoding must give identical display values.
    root = _corpus_roots()["pydicom"]
    reference = decode_file(root / "MR_small.dcm")
    decoded = decode_file(root / compressed)
    np.testing.assert_array_equal(decoded.frames, reference.frames)

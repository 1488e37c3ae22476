"""EXIF orientation: an image stored sideways with a "rotate" tag is ingested and served upright,
as every viewer shows it (a phone photograph of a lesion is commonly stored this way)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.data.image_files import ORIENTATION_TAG, decode_image_file
from tasks.model.inference import prepare_png

# A gray gradient with a marked corner: any turn or mirror of it is a different array.
UPRIGHT = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
UPRIGHT[0, 0] = 255


def _png(pixels: np.ndarray, orientation: int | None) -> bytes:
    """``pixels`` as an 8-bit gray PNG, with an ``eXIf`` orientation tag when one is given."""
    image = Image.fromarray(pixels, mode="L")
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, format="PNG")
    else:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        image.save(buffer, format="PNG", exif=exif.tobytes())
    return buffer.getvalue()


def test_a_png_stored_sideways_with_rotate_90_is_decoded_upright(tmp_path: Path) -> None:
    # Orientation 6: the stored pixels are the upright image turned 90 degrees anticlockwise;
    # the viewer turns them 90 degrees clockwise back.
    stored = np.rot90(UPRIGHT, k=1)
    path = tmp_path / "sideways.png"
    path.write_bytes(_png(np.ascontiguousarray(stored), orientation=6))
    decoded = decode_image_file(path)
    np.testing.assert_array_equal(np.round(decoded * 255).astype(np.uint8), UPRIGHT)


def test_a_mirrored_png_is_decoded_unmirrored_and_an_untagged_one_as_stored(tmp_path: Path) -> None:
    mirrored, plain = tmp_path / "mirrored.png", tmp_path / "plain.png"
    mirrored.write_bytes(_png(np.ascontiguousarray(UPRIGHT[:, ::-1]), orientation=2))
    plain.write_bytes(_png(UPRIGHT, orientation=None))
    for path in (mirrored, plain):
        decoded = decode_image_file(path)
        np.testing.assert_array_equal(np.round(decoded * 255).astype(np.uint8), UPRIGHT)


def test_the_service_turns_an_upload_as_ingestion_does(tmp_path: Path) -> None:
    sideways = _png(np.ascontiguousarray(np.rot90(UPRIGHT, k=1)), orientation=6)
    upright = _png(UPRIGHT, orientation=None)
    served = prepare_png(sideways, image_size=16)
    np.testing.assert_array_equal(served, prepare_png(upright, image_size=16))

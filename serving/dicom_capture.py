"""The Grad-CAM overlay as a DICOM Secondary Capture in the source's study, not for diagnosis.

In: the source's header (pydicom ``Dataset``), the model's uint8 image ``(S, S)`` and its
Grad-CAM map ``(S, S)`` in [0, 1] (1: strongest evidence for the decided class,
:mod:`tasks.model.explain`). Out: an RGB 8-bit SC image at least :data:`MIN_SIDE` pixels a
side, the heat map blended over the grey image and "NOT FOR DIAGNOSTIC USE" burned in.

It is marked as what it is: ImageType ``DERIVED\\SECONDARY``, BurnedInAnnotation ``YES`` (the
pixels come from the source, which may carry burned-in text, and the label is burned in: the
conservative value for anyone who de-identifies it), a SeriesDescription saying it is not for
diagnostic use, and the source in its Source Image Sequence. The colours are computed here
(no matplotlib in the Bento).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from serving.dicom_report import (
    MANUFACTURER,
    SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER,
    usable_source,
)

MIN_SIDE = 256
# Share of the heat map's colour in the blend where the map is 1 (0 where it is 0).
OVERLAY_ALPHA = 0.5
BURNED_IN_LABEL = "NOT FOR DIAGNOSTIC USE"


def overlay_rgb(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """uint8 ``(S, S)`` grey image and ``(S, S)`` map in [0, 1] → uint8 ``(N, N, 3)`` RGB,
    ``N = max(S, MIN_SIDE)``, the map as a red-to-yellow heat blended in, the label burned in."""
    from PIL import Image, ImageDraw

    side = max(image.shape[0], MIN_SIDE)
    grey = np.asarray(
        Image.fromarray(np.asarray(image, np.uint8)).resize((side, side), Image.BILINEAR),
        dtype=np.float32,
    )
    heat = np.asarray(
        Image.fromarray(np.clip(cam, 0.0, 1.0).astype(np.float32), mode="F").resize(
            (side, side), Image.BILINEAR
        ),
        dtype=np.float32,
    )
    heat = np.clip(heat, 0.0, 1.0)[..., None]
    colour = np.stack(
        [np.full_like(heat[..., 0], 255.0), 255.0 * heat[..., 0], 0 * heat[..., 0]], -1
    )
    weight = OVERLAY_ALPHA * heat
    rgb = (1.0 - weight) * grey[..., None] + weight * colour
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 0, side, 14), fill=(0, 0, 0))
    draw.text((3, 2), BURNED_IN_LABEL, fill=(255, 255, 255))
    return np.asarray(picture)


# Direction cosine axis → the patient direction it points to (PS3.3 C.7.6.1.1.1).
_AXES = (("R", "L"), ("A", "P"), ("F", "H"))


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The directions of the image's rows and columns (PS3.3 Patient Orientation): the
    source's own, or the main axis of its Image Orientation (Patient); None when it has
    neither. The capture keeps the source's geometry (only resized), so they hold for it too."""
    given = [str(v).strip() for v in (source.get("PatientOrientation") or [])]
    if len(given) == 2 and all(v and set(v) <= set("LRAPHF") for v in given):
        return given[0][0], given[1][0]
    cosines = source.get("ImageOrientationPatient")
    if cosines is None or len(cosines) != 6:
        return None
    try:
        vectors = np.asarray([float(v) for v in cosines]).reshape(2, 3)
    except (TypeError, ValueError):
        return None
    letters = []
    for vector in vectors:
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_AXES[axis][int(vector[axis] > 0)])
    return letters[0], letters[1]


def secondary_capture(source: Dataset, image: np.ndarray, cam: np.ndarray) -> hd.sc.SCImage:
    """The overlay as an SC image in the source's study (a new series), patient and study
    copied from ``source`` (highdicom's ``from_ref_dataset``)."""
    source = usable_source(source)
    orientation = patient_orientation(source)
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay_rgb(image, cam),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=orientation or ("L", "P"),
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
    )
    if orientation is None:  # unknown: empty, as the type 2 attribute allows (not a guess)
        capture.PatientOrientation = None
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.BurnedInAnnotation = "YES"
    capture.SeriesDescription = SC_SERIES_DESCRIPTION
    capture.DerivationDescription = (
        "Grad-CAM of the model's decided class over the model's input image; "
        + BURNED_IN_LABEL.lower()
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = [reference]
    return capture

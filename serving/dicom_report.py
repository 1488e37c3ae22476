"""A classification as DICOM: a Comprehensive SR of the reply and a Grad-CAM Secondary Capture.

Inputs: the source file's header (a pydicom ``Dataset``, pixel data not needed), the service's
JSON reply for it (``label``, ``probabilities``, ``abstained``, ``reason``, ``ood``,
``threshold``, ``model`` and, when present, ``prediction_set``: ``{"coverage": 0.95,
"labels": [...]}``), and for the capture the model's uint8 image ``(S, S)`` with its Grad-CAM
map ``(S, S)`` in [0, 1]. Outputs: pydicom datasets (highdicom builds and checks them) in the
source's study, in a new series each, with the source's patient and study modules (a PACS files
them with the study by those).

**Why a Comprehensive SR and not TID 1500.** TID 1500 (Measurement Report) holds measurements
and qualitative evaluations of image regions. A classifier's result also has a decision
threshold, a set of labels (the prediction set, with its coverage) and an abstention with a
reason in words (a TEXT item), none of which TID 1500/1501 has a row for, and an abstention has
no finding at all. The report is a Comprehensive SR whose tree is written here
(:func:`content_tree`); it reuses TID 4019 (Algorithm Identification) and the standard codes
where one exists (Finding DCM 121071, Source image for image processing operation DCM 121322,
Yes/No SCT 373066001/373067005, UCUM "1"). Everything else is in the private coding scheme :data:`SCHEME` ("99" prefix: local
codes, PS3.16 8.2), declared in the Coding Scheme Identification Sequence.

Nothing here logs: the datasets carry patient data, and errors are raised as
:class:`DicomOutputError` with fixed messages.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

# highdicom's warnings and log lines quote attribute values (a patient's name among them: "The
# string ... is unlikely to represent the intended person name"); none may reach a log.
warnings.filterwarnings("ignore", module=r"highdicom(\.|$)")
logging.getLogger("highdicom").setLevel(logging.CRITICAL + 1)

SCHEME = "99MEDTR"
MANUFACTURER = "medtransfer"
SR_SERIES_NUMBER = 990
SC_SERIES_NUMBER = 991
SC_SERIES_DESCRIPTION = "Grad-CAM overlay - NOT FOR DIAGNOSTIC USE"
# The attributes highdicom copies into the SR's evidence and the SC's references.
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def code(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of this project's private coding scheme :data:`SCHEME`."""
    return hd.sr.CodedConcept(value, SCHEME, meaning)


TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
CLASS = code("class", "Class")
PROBABILITY = code("probability", "Calibrated probability")
DECISION_THRESHOLD = code("threshold", "Decision threshold")
ABSTAINED = code("abstained", "Abstained")
ABSTENTION_REASON = code("reason", "Abstention reason")
OOD_SCORE = code("ood-score", "Out-of-distribution score")
OOD_THRESHOLD = code("ood-threshold", "Out-of-distribution threshold")
PREDICTION_SET = code("prediction-set", "Prediction set")
COVERAGE = code("coverage", "Nominal coverage")
MEMBER = code("member", "Member")
NO_UNITS = codes.UCUM.NoUnits
CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
PROPERTIES = hd.sr.RelationshipTypeValues.HAS_PROPERTIES


class DicomOutputError(Exception):
    """The source cannot carry DICOM output (e.g. it lacks a UID the output must reference)."""


def class_code(name: str) -> hd.sr.CodedConcept:
    """A class of the model (its name from the training labels) as a coded value."""
    return code(name, name)


def _number(name, value: float, relationship=PROPERTIES) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name, float(value), NO_UNITS, relationship_type=relationship)


def _with_children(item, children: Sequence) -> hd.sr.ContentItem:
    if children:
        item.ContentSequence = hd.sr.ContentSequence(list(children), is_root=False)
    return item


def _abstention(reply: dict) -> hd.sr.CodeContentItem:
    """CODE Abstained = Yes/No, with the OOD score, its threshold and (when Yes) the reason."""
    abstained = bool(reply.get("abstained"))
    ood = reply.get("ood") or {}
    children = []
    if ood.get("score") is not None:
        children.append(_number(OOD_SCORE, ood["score"]))
    if ood.get("threshold") is not None:
        children.append(_number(OOD_THRESHOLD, ood["threshold"]))
    if abstained:
        children.append(
            hd.sr.TextContentItem(ABSTENTION_REASON, reply["reason"], relationship_type=PROPERTIES)
        )
    value = codes.SCT.Yes if abstained else codes.SCT.No
    return _with_children(hd.sr.CodeContentItem(ABSTAINED, value, CONTAINS), children)


def _findings(reply: dict) -> list[hd.sr.ContentItem]:
    """The decision (CODE Finding = label, with the threshold) and one CODE Class per class
    with its calibrated probability; nothing when the reply abstained."""
    if reply.get("abstained") or reply.get("label") is None:
        return []
    threshold = reply.get("threshold")
    decision = hd.sr.CodeContentItem(codes.DCM.Finding, class_code(reply["label"]), CONTAINS)
    items = [
        _with_children(
            decision, [_number(DECISION_THRESHOLD, threshold)] if threshold is not None else []
        )
    ]
    for name, probability in (reply.get("probabilities") or {}).items():
        item = hd.sr.CodeContentItem(CLASS, class_code(name), CONTAINS)
        items.append(_with_children(item, [_number(PROBABILITY, probability)]))
    return items


def _prediction_set(reply: dict) -> list[hd.sr.ContentItem]:
    """CONTAINER Prediction set: its nominal coverage and one CODE Member per label."""
    found = reply.get("prediction_set")
    if not found:
        return []
    container = hd.sr.ContainerContentItem(PREDICTION_SET, relationship_type=CONTAINS)
    children: list = []
    if found.get("coverage") is not None:
        children.append(_number(COVERAGE, found["coverage"]))
    for label in found.get("labels") or []:
        children.append(hd.sr.CodeContentItem(MEMBER, class_code(str(label)), CONTAINS))
    return [_with_children(container, children)]


def algorithm(model: dict) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the registered model's name and version; the dataset version and the Bento's
    model tag as parameters."""
    parameters = [
        f"dataset_version={model.get('dataset_version') or ''}",
        f"bento_model={model.get('bento_model') or ''}",
    ]
    return hd.sr.AlgorithmIdentification(
        name=model.get("name") or "medtransfer-student",
        version=str(model.get("version") or "unregistered"),
        parameters=parameters,
    )


def content_tree(source: Dataset, reply: dict) -> hd.sr.ContainerContentItem:
    """The SR's root CONTAINER (see the module docstring for the tree)."""
    root = hd.sr.ContainerContentItem(TITLE, template_id=None)
    items: list = list(algorithm(reply.get("model") or {}))
    items.append(
        hd.sr.ImageContentItem(
            codes.DCM.SourceImageForImageProcessingOperation,
            source.SOPClassUID,
            source.SOPInstanceUID,
            relationship_type=CONTAINS,
        )
    )
    items.append(_abstention(reply))
    items += _findings(reply)
    items += _prediction_set(reply)
    root.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    return root


# Dates and times highdicom parses from the source; a non-conformant one (e.g. "14:04:38" as
# a TM) made it raise.
_DATES = ("StudyDate", "PatientBirthDate", "SeriesDate", "ContentDate")
_TIMES = ("StudyTime", "SeriesTime", "ContentTime")
# Type 2 attributes of the Patient and General Study modules the outputs copy: present, empty
# when the source lacks them (highdicom reads each one).
_TYPE_2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip


def usable_source(source: Dataset) -> Dataset:
    """A copy of ``source``'s header that highdicom accepts: the UIDs checked (else
    :class:`DicomOutputError`, naming the keyword only), non-conformant dates and times
    emptied and missing type 2 patient and study attributes added empty, pixel data left
    out."""
    for keyword in REQUIRED_UIDS:
        if not str(source.get(keyword, "") or "").strip():
            raise DicomOutputError(keyword)
    header = Dataset()
    header.update({tag: element for tag, element in source.items() if tag < 0x7FE00000})
    for keywords, kind in ((_DATES, DA), (_TIMES, TM)):
        for keyword in keywords:
            if keyword in header and header[keyword].value not in (None, ""):
                try:
                    kind(header[keyword].value)
                except (TypeError, ValueError):
                    header[keyword].value = None
    for keyword in _TYPE_2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def structured_report(source: Dataset, reply: dict) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR of one reply, in the source's study (a new series)."""
    source = usable_source(source)
    report = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=content_tree(source, reply),
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="medtransfer classification - NOT FOR DIAGNOSTIC USE",
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "medtransfer local codes"
    scheme.CodingSchemeResponsibleOrganization = "medtransfer"
    report.CodingSchemeIdentificationSequence = [scheme]
    return report

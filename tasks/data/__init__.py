"""DICOM decoding, preprocessing, labels, patient-level splits, the synthetic generator, ingestion and the processed dataset."""

"""Evaluation: DAVIS J&F for videos, interactive mIoU / NoC for images, reports and overlays.

Entry points: `evaluate_video_dataset`, `evaluate_image_dataset` (raw datasets, full resolution),
`ValidationMetrics` (training batches, inside the trainer), `python training/evaluate.py` (CLI).
"""

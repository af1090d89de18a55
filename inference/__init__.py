"""Batch inference: folders of images -> detections as per-image JSON, drawn PNGs and one COCO
results file, on any backend. Library code the CLI calls; it never imports the CLI."""

"""COCO evaluation (pycocotools) of any backend's detections. Never imports the CLI."""

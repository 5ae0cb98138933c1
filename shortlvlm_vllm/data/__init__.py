"""Data the pipeline runs on: calibration sources and the synthetic VQA set."""

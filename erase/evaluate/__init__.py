"""`erase evaluate`: detectors, preservation metrics and reports for erased checkpoints."""

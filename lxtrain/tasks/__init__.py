"""Pre-training tasks: masking, objectives and the task schedule."""

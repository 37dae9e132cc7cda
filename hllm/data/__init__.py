"""Data pipeline: files -> interactions + item table -> SequenceData -> batches."""

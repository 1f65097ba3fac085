"""Training pieces that are not the model: data pipeline, criterion, schedule, loop."""

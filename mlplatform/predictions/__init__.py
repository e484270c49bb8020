"""Batch predictions of the champion model, one daily partition at a time."""

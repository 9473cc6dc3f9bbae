"""Offline batch inference in the OpenAI Batch file format (CLI runner, online /v1/batches)."""

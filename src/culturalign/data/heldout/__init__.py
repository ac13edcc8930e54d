"""Held-out data: the MCQ knowledge check's questions and the neutral perplexity text."""

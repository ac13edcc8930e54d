"""Instrument JSON files (`culturalign.instrument/1`): the VSM 2013 and its paraphrased variants."""

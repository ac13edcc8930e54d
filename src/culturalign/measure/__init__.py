"""Measure: the questionnaire-to-score stage of the pipeline.

An instrument (`instrument`: the VSM 2013's items and index definitions) is put to the model as chat
prompts (`prompts`: one per item and prompt profile); the model's answer distributions become index
scores and an L1 distance to a target culture's published scores (`targets`), beside the uniform
answerer's floor (`survey`); `report` shows the profiles as tables and a radar plot.
"""

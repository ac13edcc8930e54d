"""Held-out checks of an aligned soft prompt, each measured without and with the prompt.

    perplexity.py  perplexity of a neutral text through `Backend.loglikelihood`
"""

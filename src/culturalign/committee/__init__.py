"""A committee of cultural experts: soft-prompt experts, a router, composed answers, honest metrics."""

"""The committee's data: cultures, the router's gate exemplars, evaluation queries (see PROVENANCE.md)."""

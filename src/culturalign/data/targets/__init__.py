"""Target sets: published Hofstede scores per country or region (CSV)."""

"""Graph analysis: linears, fingerprints (and, later, regions)."""

"""Evidence of no skew: the consistency job's verdicts and the drift measures
and report."""

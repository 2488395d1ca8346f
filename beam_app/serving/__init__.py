"""What the streaming job and batch scoring share around the model: the
handler kept across bundles (kept_model.py), the rows they make (rows.py),
and how the streaming job stops on the DirectRunner (stop.py)."""

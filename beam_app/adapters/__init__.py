"""The CSV adapters of the shipped data sets, one module each; a spec names
its adapter as `beam_app.adapters.<module>:<function>` (transforms/adapters.py)."""

"""Plumbing every command shares: options and their checks, usage errors, time
flags, inputs, counter names, the job report and runner helpers."""

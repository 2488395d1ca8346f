"""BigQuery: the client (Google's or an emulator's endpoint), history read as
events, the job's table schemas and rows, the tables' preparation and
streaming inserts (write.py), the rows a running job has written (counts.py),
the served log."""

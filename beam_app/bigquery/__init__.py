"""BigQuery: the client (Google's or an emulator's endpoint), history read as
events, the job's table schemas and rows, streaming inserts, the served log."""

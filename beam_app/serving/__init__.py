"""What the streaming job and batch scoring share around the model: the
handler kept across bundles and the rows they write."""

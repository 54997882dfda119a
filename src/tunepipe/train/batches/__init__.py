"""The batches a trainer reads: shards, collation, padding-free attention."""

"""What every reportflow process shares: configuration, events, tracing, database, documents, mail."""

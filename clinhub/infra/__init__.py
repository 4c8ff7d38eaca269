"""Local real services (Kafka in KRaft mode, a schema registry, PostgreSQL), started from our own files."""

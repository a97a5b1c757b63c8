"""lowmark: consistent block replication through Kafka (pipeline side)."""

"""Operations: the audit log and the metrics a node exposes."""

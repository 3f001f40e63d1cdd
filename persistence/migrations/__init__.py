"""Versioned SQL migrations, applied in file-name order by ``walletd.persistence.migrate``."""

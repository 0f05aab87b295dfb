"""End-to-end data protection: protection information formats, checks and guard CRCs."""

"""Development tooling: --dev certificates, the demo page and its ticket endpoint."""

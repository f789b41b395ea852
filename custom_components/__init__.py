"""Custom integrations of this repository (Home Assistant loads custom_components.<domain>)."""

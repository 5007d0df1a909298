"""What a person reads: text tables, figures, the report page."""

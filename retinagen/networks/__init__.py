"""retinagen networks package."""

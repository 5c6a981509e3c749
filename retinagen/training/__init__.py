"""retinagen training package."""

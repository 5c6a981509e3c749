"""retinagen metrics package."""

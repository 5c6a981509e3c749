"""retinagen data package."""

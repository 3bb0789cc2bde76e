"""The compact training engine shared by all erasure methods."""

"""feature_repo package."""

"""Images: an OCI image store, safe layer extraction, recipes and builds, import/export."""

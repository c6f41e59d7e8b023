"""Model families (one file each), the layers they share, and the architecture registry."""

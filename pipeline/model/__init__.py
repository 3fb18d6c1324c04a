"""The ViT model (torch only: nothing distributed, no tracking)."""

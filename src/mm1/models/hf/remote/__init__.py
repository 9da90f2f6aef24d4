"""transformers custom code that `mm1 convert --to-hf` copies next to a custom-code export."""
